#!/usr/bin/env bash
# The limits stage: its per-request cost with the local and the Redis
# backend, and tenant isolation under a flood.
#
#   bench/limits.sh
#
# 1. Two gateways, one with `backend = "local"`, one with `backend =
#    "redis"` (a local redis-server), take the same closed-loop wrk load;
#    the difference in the gateway's CPU per request is the Redis cost.
# 2. Isolation: tenant "steady" sends at a fixed rate while tenant "noisy"
#    floods at 20x its limit; steady's p99 is compared with its p99 alone.
#
# Needs wrk and redis-server. Writes results to $OUT and prints them.
set -euo pipefail
cd "$(dirname "$0")/.."
NOISY_RPS=${NOISY_RPS:-100}
source bench/lib.sh
command -v redis-server >/dev/null || { echo "redis-server is missing" >&2; exit 1; }
cargo build --release --quiet --example loadgen
LOADGEN=$PWD/target/release/examples/loadgen

taskset -c "$LOAD_CPU" redis-server --port 18379 --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
pids+=($!)
sleep 0.5

gateway local 18020 19020
LOCAL_PID=$GW_PID
gateway redis 18021 19021 '[limits]
backend = "redis"
redis_url = "redis://127.0.0.1:18379"
on_backend_error = "closed"'
REDIS_PID=$GW_PID

TOK=$(token acme)
measure limits-local "http://127.0.0.1:18020/v1/chat/completions" "$TOK" "$LOCAL_PID"
measure limits-redis "http://127.0.0.1:18021/v1/chat/completions" "$TOK" "$REDIS_PID"

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
  table limits-local limits-redis
  python3 - "$OUT/results.jsonl" "$alone" "$during" "$(cat "$WORK/flood.json")" "$STEADY_RATE" "$FLOOD_RATE" "$NOISY_RPS" <<'PY'
import json, sys
rows = {r["case"]: r for r in map(json.loads, open(sys.argv[1]))}
l, r = rows["limits-local"], rows["limits-redis"]
print(f"\nRedis backend adds {r['gateway_cpu_us_per_req'] - l['gateway_cpu_us_per_req']:.1f} µs of gateway CPU per request "
      f"({l['gateway_cpu_us_per_req']} -> {r['gateway_cpu_us_per_req']}); throughput ratio {r['rps'] / l['rps']:.2f}.")
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
