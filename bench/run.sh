#!/usr/bin/env bash
# Gateway overhead benchmark: the same 1 KiB chat request sent directly to
# the mock router and through Portcullis (JWT auth, header policy, body
# gate, token reservation, signed context), measured in one run so the
# ratio is meaningful on a noisy box.
#
#   bench/run.sh                       # 50 connections, 10 s per case
#   DURATION=20 CONNECTIONS=100 bench/run.sh
#
# Needs wrk (apt-get install wrk). Writes results.md and results.jsonl to
# $OUT (default: a fresh temp dir) and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

gateway portcullis 18010 19010
measure direct "http://$ROUTER/v1/chat/completions" "" -
measure portcullis-jwt "http://127.0.0.1:18010/v1/chat/completions" "$(token acme)" "$GW_PID"

{
  echo "1 KiB chat body, $CONNECTIONS keep-alive connections, $DURATION s per case; gateway pinned to one core."
  echo
  table direct portcullis-jwt
  python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
rows = {r["case"]: r for r in map(json.loads, open(sys.argv[1]))}
d, p = rows["direct"], rows["portcullis-jwt"]
print(f"\nthroughput ratio gateway/direct: {p['rps'] / d['rps']:.2f}; "
      f"p50 added by the gateway: {p['p50_ms'] - d['p50_ms']:.2f} ms; "
      f"p99 ratio: {p['p99_ms'] / d['p99_ms']:.2f}")
PY
} | tee "$OUT/results.md"
echo "results: $OUT"
