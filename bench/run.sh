#!/usr/bin/env bash
# Gateway overhead benchmark: the same 1 KiB chat request sent directly to
# the mock router and through Portcullis (JWT auth, header policy, signed
# context), measured in one run so the ratio is meaningful on a noisy box.
#
#   bench/run.sh                       # defaults: 50 connections, 10 s per case
#   DURATION=20 CONNECTIONS=100 bench/run.sh
#
# Needs wrk (apt-get install wrk). Writes results.md and results.jsonl to
# $OUT (default: a fresh temp dir) and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNECTIONS=${CONNECTIONS:-50}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-bench.XXXXXX")
OUT=${OUT:-$WORK/results}
ROUTER=127.0.0.1:${ROUTER_PORT:-18080}
GATEWAY=127.0.0.1:${GATEWAY_PORT:-18010}
ADMIN=127.0.0.1:${ADMIN_PORT:-19010}
mkdir -p "$OUT"

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
cargo build --release --quiet
BIN=$PWD/target/release/portcullis

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Dev credentials and a config with generous limits, so nothing throttles.
"$BIN" certs dev --out "$WORK/certs" --jwks "$WORK/jwks.json" >/dev/null
cat > "$WORK/tenants.toml" <<TOML
[plans.bench]
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

[[tenants]]
id = "acme"
org = "acme-corp"
plan = "bench"
TOML
cat > "$WORK/gateway.toml" <<TOML
[server]
listen = ["$GATEWAY"]
threads = 1
region = "us-east-1"
grace_period_seconds = 1
graceful_shutdown_timeout_seconds = 1
pid_file = "$WORK/portcullis.pid"
upgrade_sock = "$WORK/upgrade.sock"

[admin]
listen = "$ADMIN"

[upstream]
address = "$ROUTER"

[auth.jwt]
issuer = "https://idp.example.com"
audiences = ["portcullis"]
jwks_file = "jwks.json"

[policy]
tenants = "tenants.toml"

[context]
signing_key_file = "certs/context.key"
TOML
TOKEN=$("$BIN" token mint --tenant acme --key "$WORK/certs/dev-jwt.pem" --ttl 86400)
export TOKEN
python3 - "$WORK/body-1k.json" <<'PY'
import json, sys
msg = {"model": "m-small", "max_tokens": 256, "messages": [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": ""}]}
pad = 1024 - len(json.dumps(msg, separators=(",", ":")))
msg["messages"][1]["content"] = ("Why does the pipeline fail? " * 64)[:pad]
open(sys.argv[1], "w").write(json.dumps(msg, separators=(",", ":")))
PY
export BODY_FILE=$WORK/body-1k.json

taskset -c "$LOAD_CPU" "$BIN" mock-router --listen "$ROUTER" >"$WORK/router.log" 2>&1 &
pids+=($!)
PORTCULLIS_LOG=${PORTCULLIS_LOG:-info} taskset -c "$PROXY_CPU" "$BIN" serve -c "$WORK/gateway.toml" >"$WORK/gateway.log" 2>&1 &
GW_PID=$!
pids+=($GW_PID)
for _ in $(seq 100); do
  curl -fs "http://$ADMIN/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$GATEWAY/v1/chat/completions" \
  -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' --data-binary @"$BODY_FILE")
[ "$code" = 200 ] || { echo "sanity request through the gateway got $code" >&2; exit 1; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run CASE URL TOKEN: warm up, then measure; appends a JSON row.
run() {
  local name=$1 url=$2 token=$3
  TOKEN=$token taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" -s bench/wrk-post.lua "$url" >/dev/null
  local t0; t0=$(cpu_ticks "$GW_PID")
  local out; out=$(TOKEN=$token taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s bench/wrk-post.lua "$url")
  local t1; t1=$(cpu_ticks "$GW_PID")
  local row; row=$(grep '^RESULT ' <<<"$out" | cut -d' ' -f2-)
  python3 - "$name" "$row" "$((t1 - t0))" "$(getconf CLK_TCK)" >>"$OUT/results.jsonl" <<'PY'
import json, sys
name, row, ticks, hz = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
row["case"] = name
cpu_s = ticks / hz
row["gateway_cpu_us_per_req"] = round(cpu_s * 1e6 / row["requests"], 1) if name != "direct" else None
print(json.dumps(row))
PY
}

: >"$OUT/results.jsonl"
run direct "http://$ROUTER/v1/chat/completions" ""
run portcullis-jwt "http://$GATEWAY/v1/chat/completions" "$TOKEN"

python3 - "$OUT" "$CONNECTIONS" "$DURATION" <<'PY' | tee "$OUT/results.md"
import json, sys
out, conns, dur = sys.argv[1], sys.argv[2], sys.argv[3]
rows = {r["case"]: r for r in map(json.loads, open(f"{out}/results.jsonl"))}
print(f"1 KiB chat body, {conns} keep-alive connections, {dur} s per case; gateway pinned to one core.\n")
print("| case | req/s | p50 ms | p99 ms | p99.9 ms | gateway CPU µs/req | errors | non-2xx |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name in ("direct", "portcullis-jwt"):
    r = rows[name]
    cpu = "–" if r["gateway_cpu_us_per_req"] is None else r["gateway_cpu_us_per_req"]
    print(f"| {name} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {cpu} | {r['errors']} | {r['non_2xx']} |")
d, p = rows["direct"], rows["portcullis-jwt"]
print(f"\nthroughput ratio gateway/direct: {p['rps'] / d['rps']:.2f}; "
      f"p50 added by the gateway: {p['p50_ms'] - d['p50_ms']:.2f} ms; "
      f"p99 ratio: {p['p99_ms'] / d['p99_ms']:.2f}")
PY
echo "results: $OUT"
