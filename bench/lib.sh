# Shared pieces of the benchmark scripts: build, dev credentials, configs,
# the mock router and gateways, and a wrk measurement with the gateway's
# CPU time. Source it; it expects to run from the repository root.

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNECTIONS=${CONNECTIONS:-50}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-bench.XXXXXX")
OUT=${OUT:-$WORK/results}
ROUTER=127.0.0.1:${ROUTER_PORT:-18080}
mkdir -p "$OUT"

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
cargo build --release --quiet
BIN=$PWD/target/release/portcullis

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$BIN" certs dev --out "$WORK/certs" --jwks "$WORK/jwks.json" >/dev/null
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

# A plan that never throttles, and two tenants on plans of their own.
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

[plans.noisy]
requests_per_second = ${NOISY_RPS:-100}
burst = ${NOISY_RPS:-100}
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

[[tenants]]
id = "steady"
org = "steady-co"
plan = "bench"

[[tenants]]
id = "noisy"
org = "noisy-co"
plan = "noisy"
TOML

token() { "$BIN" token mint --tenant "$1" --key "$WORK/certs/dev-jwt.pem" --ttl 86400; }

# gateway NAME PORT ADMIN_PORT [EXTRA_TOML]: writes its config, starts it
# pinned to PROXY_CPU, waits until it serves; sets GW_PID. POLICY_EXTRA
# adds lines to its [policy] table.
gateway() {
  local name=$1 port=$2 admin=$3 extra=${4:-}
  cat > "$WORK/$name.toml" <<TOML
[server]
listen = ["127.0.0.1:$port"]
threads = 1
region = "us-east-1"
grace_period_seconds = 1
graceful_shutdown_timeout_seconds = 1
pid_file = "$WORK/$name.pid"
upgrade_sock = "$WORK/$name.sock"

[admin]
listen = "127.0.0.1:$admin"

[upstream]
address = "$ROUTER"

[auth.jwt]
issuer = "https://idp.example.com"
audiences = ["portcullis"]
jwks_file = "jwks.json"

[policy]
tenants = "tenants.toml"
${POLICY_EXTRA:-}

[context]
signing_key_file = "certs/context.key"

$extra
TOML
  PORTCULLIS_LOG=${PORTCULLIS_LOG:-info} taskset -c "$PROXY_CPU" "$BIN" serve -c "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
  GW_PID=$!
  pids+=($GW_PID)
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/chat/completions" \
    -H "Authorization: Bearer $(token acme)" -H 'Content-Type: application/json' --data-binary @"$BODY_FILE")
  [ "$code" = 200 ] || { echo "sanity request through $name got $code" >&2; cat "$WORK/$name.log" >&2; exit 1; }
}

taskset -c "$LOAD_CPU" "$BIN" mock-router --listen "$ROUTER" >"$WORK/router.log" 2>&1 &
pids+=($!)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# measure CASE URL TOKEN PID: warm up, then measure with wrk; appends a JSON
# row with the CPU time PID spent per request (none for PID "-").
measure() {
  local name=$1 url=$2 tok=$3 pid=$4
  TOKEN=$tok taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" -s bench/wrk-post.lua "$url" >/dev/null
  local t0=0 t1=0 out row
  [ "$pid" = - ] || t0=$(cpu_ticks "$pid")
  out=$(TOKEN=$tok taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s bench/wrk-post.lua "$url")
  [ "$pid" = - ] || t1=$(cpu_ticks "$pid")
  row=$(grep '^RESULT ' <<<"$out" | cut -d' ' -f2-)
  python3 - "$name" "$row" "$((t1 - t0))" "$(getconf CLK_TCK)" "$pid" >>"$OUT/results.jsonl" <<'PY'
import json, sys
name, row, ticks, hz, pid = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
row["case"] = name
row["gateway_cpu_us_per_req"] = None if pid == "-" else round(ticks / hz * 1e6 / row["requests"], 1)
print(json.dumps(row))
PY
}

# table CASE...: the Markdown table of the named rows.
table() {
  python3 - "$OUT/results.jsonl" "$@" <<'PY'
import json, sys
rows = {r["case"]: r for r in map(json.loads, open(sys.argv[1]))}
print("| case | req/s | p50 ms | p99 ms | p99.9 ms | gateway CPU µs/req | errors | non-2xx |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name in sys.argv[2:]:
    r = rows[name]
    cpu = "–" if r["gateway_cpu_us_per_req"] is None else r["gateway_cpu_us_per_req"]
    print(f"| {name} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {cpu} | {r['errors']} | {r['non_2xx']} |")
PY
}
: >"$OUT/results.jsonl"
