#!/usr/bin/env bash
# The limits stage: its per-request cost with the local and the Redis
# backend, and tenant isolation under a flood.
#
#   bench/limits.sh
#
# 1. Two gateways, one with `backend = "local"`, one with `backend =
#    "redis"` (a local redis-server), take the same closed-loop wrk load;
#    the difference in the gateway's CPU per request is the Redis cost.
#    Each backend is measured with one scope (a listed API key of a plain
#    tenant) and with three (a key object with limits and a budget of its
#    own, a model scope, and a tenant with a budget at [prices]), every
#    limit far above the load, so the cost is the scopes' bookkeeping.
# 2. Isolation: tenant "steady" sends at a fixed rate while tenant "noisy"
#    floods at 20x its limit; steady's p99 is compared with its p99 alone.
#
# Needs wrk and redis-server. Writes results to $OUT and prints them.
set -euo pipefail
cd "$(dirname "$0")/.."
NOISY_RPS=${NOISY_RPS:-100}
source bench/lib.sh

# Two more tenants for the scope cost: one credential each, as API keys.
one=$("$BIN" keys new); three=$("$BIN" keys new --id scoped)
{ echo "one_key=$(sed -n 's/^API key.*: //p' <<<"$one")"
  echo "three_key=$(sed -n 's/^API key.*: //p' <<<"$three")"; } >"$WORK/scope-keys"
cat >> "$WORK/tenants.toml" <<TOML

[prices."m-small"]
input = 0.000001
output = 0.000001

[plans.scoped]
requests_per_second = 1_000_000
burst = 1_000_000
tokens_per_minute = 1_000_000_000_000
tokens_per_day = 1_000_000_000_000
max_concurrency = 100_000
max_body_bytes = 1_048_576
max_prompt_tokens = 1_000_000
max_output_tokens = 4_096
models = ["m-small"]
features = ["chat"]
budget_per_day = 1_000_000_000.0

[plans.scoped.model_limits."m-*"]
requests_per_second = 1_000_000
tokens_per_minute = 1_000_000_000_000
max_concurrency = 100_000

[[tenants]]
id = "one"
org = "one-co"
plan = "bench"
$(sed -n 's/^Add to the tenant in tenants.toml:  //p' <<<"$one")

[[tenants]]
id = "three"
org = "three-co"
plan = "scoped"
$(sed -n '/^\[\[tenants.keys\]\]/,/^hash/p' <<<"$three")
requests_per_second = 1_000_000
tokens_per_day = 1_000_000_000_000
max_concurrency = 100_000
budget_per_day = 1_000_000_000.0
TOML
command -v redis-server >/dev/null || { echo "redis-server is missing" >&2; exit 1; }
cargo build --release --quiet --example loadgen
LOADGEN=$PWD/target/release/examples/loadgen

taskset -c "$LOAD_CPU" redis-server --port 18379 --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
REDIS_SERVER_PID=$!
pids+=($REDIS_SERVER_PID)
sleep 0.5

gateway local 18020 19020
LOCAL_PID=$GW_PID
gateway redis 18021 19021 '[limits]
backend = "redis"
redis_url = "redis://127.0.0.1:18379"
on_backend_error = "closed"'
REDIS_PID=$GW_PID

ONE=$(sed -n 's/^one_key=//p' "$WORK/scope-keys")
THREE=$(sed -n 's/^three_key=//p' "$WORK/scope-keys")
# 1 and 3 scopes in turn, ROUNDS times, so the box's drift hits both
# alike; redis-server's own CPU per request is recorded beside.
ROUNDS=${ROUNDS:-3}
for r in $(seq "$ROUNDS"); do
  for backend in local redis; do
    port=18020; pid=$LOCAL_PID
    [ "$backend" = redis ] && { port=18021; pid=$REDIS_PID; }
    for scopes in 1scope 3scopes; do
      tok=$ONE; [ "$scopes" = 3scopes ] && tok=$THREE
      r0=$(cpu_ticks "$REDIS_SERVER_PID")
      measure "limits-$backend-$scopes-$r" "http://127.0.0.1:$port/v1/chat/completions" "$tok" "$pid"
      echo "limits-$backend-$scopes-$r $(( $(cpu_ticks "$REDIS_SERVER_PID") - r0 ))" >>"$WORK/redis-ticks"
    done
  done
done

STEADY_RATE=${STEADY_RATE:-500}
FLOOD_RATE=$((NOISY_RPS * 20))
steady() { taskset -c "$LOAD_CPU" "$LOADGEN" 127.0.0.1:18020 /v1/chat/completions "$(token steady)" "$BODY_FILE" "$STEADY_RATE" "$DURATION" 4; }
alone=$(steady)
taskset -c "$LOAD_CPU" "$LOADGEN" 127.0.0.1:18020 /v1/chat/completions "$(token noisy)" "$BODY_FILE" "$FLOOD_RATE" "$((DURATION + 2))" 16 >"$WORK/flood.json" &
flood_pid=$!
sleep 1
during=$(steady)
wait "$flood_pid"

{
  echo "Limits stage: 1 KiB chat body, $CONNECTIONS keep-alive connections, $DURATION s per case; gateway pinned to one core."
  echo
  table $(for r in $(seq "$ROUNDS"); do echo limits-local-1scope-$r limits-local-3scopes-$r limits-redis-1scope-$r limits-redis-3scopes-$r; done)
  python3 - "$OUT/results.jsonl" "$alone" "$during" "$(cat "$WORK/flood.json")" "$STEADY_RATE" "$FLOOD_RATE" "$NOISY_RPS" "$WORK/redis-ticks" "$(getconf CLK_TCK)" <<'PY'
import json, statistics, sys
rows = {r["case"]: r for r in map(json.loads, open(sys.argv[1]))}
hz = int(sys.argv[9])
redis = {c: int(t) for c, t in (l.split() for l in open(sys.argv[8]))}
def med(case, f):
    return statistics.median(f(c) for c in rows if c.rsplit("-", 1)[0] == case)
cpu = lambda case: med(case, lambda c: rows[c]["gateway_cpu_us_per_req"])
rps = lambda case: med(case, lambda c: rows[c]["rps"])
rcpu = lambda case: med(case, lambda c: redis[c] / hz * 1e6 / rows[c]["requests"])
l, r = "limits-local-1scope", "limits-redis-1scope"
print(f"\nMedians of the rounds. Redis backend adds {cpu(r) - cpu(l):.1f} µs of gateway CPU per request "
      f"({cpu(l)} -> {cpu(r)}); throughput ratio {rps(r) / rps(l):.2f}.")
for b in ("local", "redis"):
    one, three = cpu(f"limits-{b}-1scope"), cpu(f"limits-{b}-3scopes")
    print(f"{b}: 3 scopes / 1 scope = {three / one:.3f} ({one} -> {three} µs/req)"
          + (" (target <= 1.10)" if b == "local" else ""))
for s in ("1scope", "3scopes"):
    print(f"redis-server CPU per request, {s}: {rcpu(f'limits-redis-{s}'):.1f} µs "
          f"(~{1e6 / rcpu(f'limits-redis-{s}'):,.0f} gateway requests/s per Redis core)")
alone, during, flood = (json.loads(x) for x in sys.argv[2:5])
steady_rate, flood_rate, noisy = sys.argv[5:8]
ok = lambda s: s["statuses"].get("200", 0)
print(f"\nIsolation: steady at {steady_rate} req/s; noisy floods at {flood_rate} req/s (20x its {noisy} req/s limit).")
print("\n| steady | sent | 200 | other | p50 ms | p99 ms | p99.9 ms |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, s in (("alone", alone), ("during flood", during)):
    print(f"| {name} | {s['sent']} | {ok(s)} | {s['sent'] - ok(s)} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['p999_ms']:.2f} |")
print(f"\nnoisy: {flood['sent']} sent, statuses {flood['statuses']}")
print(f"steady p99 during the flood / alone: {during['p99_ms'] / alone['p99_ms']:.2f} (target <= 2)")
PY
} | tee "$OUT/limits.md"
echo "results: $OUT"
