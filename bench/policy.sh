#!/usr/bin/env bash
# The policy stage's cost: the shipped Rego policy (policies/authz.rego)
# measured two ways in one run.
#  - in the gateway: the same 1 KiB chat load through a gateway without a
#    policy and one with it, both pinned to one core; the difference in
#    CPU per request is what the policy adds.
#  - alone: the Criterion bench (benches/policy.rs) of input + evaluation
#    + verdict.
# Target: the policy costs at most a quarter of the gateway's whole
# per-request overhead. Needs wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

cp policies/authz.rego "$WORK/authz.rego"
gateway plain 18010 19010
PLAIN_PID=$GW_PID
POLICY_EXTRA='rego = "authz.rego"' gateway rego 18011 19011
REGO_PID=$GW_PID
# Dev tokens carry scope inference:write, so the shipped policy allows them.
measure no-policy "http://127.0.0.1:18010/v1/chat/completions" "$(token acme)" "$PLAIN_PID"
measure shipped-rego "http://127.0.0.1:18011/v1/chat/completions" "$(token acme)" "$REGO_PID"
cargo bench --bench policy -- --warm-up-time 2 --measurement-time 5 >/dev/null 2>&1

{
  echo "1 KiB chat body, $CONNECTIONS keep-alive connections, $DURATION s per case; gateways pinned to one core."
  echo
  table no-policy shipped-rego
  python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
rows = {r["case"]: r for r in map(json.loads, open(sys.argv[1]))}
plain, rego = rows["no-policy"]["gateway_cpu_us_per_req"], rows["shipped-rego"]["gateway_cpu_us_per_req"]
alone = json.load(open("target/criterion/shipped_policy/input_eval_verdict/new/estimates.json"))["mean"]["point_estimate"] / 1000
print(f"\npolicy in the gateway: +{rego - plain:.1f} µs/request ({(rego - plain) / rego:.0%} of {rego:.1f} µs); "
      f"alone (input + eval + verdict, Criterion): {alone:.1f} µs = {alone / rego:.0%} of the gateway's per-request CPU (target <= 25%)")
PY
} | tee "$OUT/results.md"
echo "results: $OUT"
