#!/usr/bin/env bash
# Portcullis side by side with Envoy's gateway configuration, Envoy as a
# plain passthrough, nginx's plain proxy and a bare Pingora proxy, all on the
# same Rust mock router, measured in one run so the ratios mean something on
# a shared, noisy box. One command: it installs what is missing, builds,
# starts every piece, runs the load and writes the table.
#
#   bench/compare.sh                         # every scenario, ~15 min
#   SCENARIOS="1k fixed" REPS=1 bench/compare.sh
#
# Scenarios: 1k 32k sse tls redis rego threads dialects proxy tracing guardrails syscalls fixed rss (see
# bench/RESULTS.md). dialects: the 1 KiB full path as chat, Responses and
# Anthropic Messages, in turn.
# Env: DURATION=10 WARMUP=3 CONNS=50 REPS=3 FIXED_QPS=5000 IDLE_CONNS=10000
#      PROXY_CPU=0 LOAD_CPU=1 (the proxy alone on PROXY_CPU; the load
#      generator and the mock router share LOAD_CPU)
#      BENCH_WORK=<scratch dir>  OUT=<results dir>  SKIP_SETUP=1
# Writes OUT/raw.jsonl (one JSON row per measurement) and OUT/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BENCH=$ROOT/bench
WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/portcullis-bench}
OUT=${OUT:-$WORK/results/$(date +%Y%m%d-%H%M%S)}
DURATION=${DURATION:-10}; WARMUP=${WARMUP:-3}; CONNS=${CONNS:-50}; REPS=${REPS:-3}
FIXED_QPS=${FIXED_QPS:-5000}; IDLE_CONNS=${IDLE_CONNS:-10000}
PROXY_CPU=${PROXY_CPU:-0}; LOAD_CPU=${LOAD_CPU:-1}
SCENARIOS=${SCENARIOS:-"1k 32k sse tls redis rego threads dialects proxy tracing guardrails syscalls fixed rss"}
RUN=$WORK/run; LOGS=$WORK/logs; GEN=$WORK/gen; KEYS=$WORK/keys
mkdir -p "$OUT" "$RUN" "$LOGS" "$GEN" "$WORK/nginx-prefix/logs"

[[ ${SKIP_SETUP:-0} == 1 ]] || BENCH_WORK=$WORK "$BENCH/setup.sh"
VENV=$WORK/venv; PY=$VENV/bin/python
OHA=$WORK/cargo-root/bin/oha
NGINX=$(PATH=$PATH:/usr/sbin command -v nginx)
ENVOY=$(ls "$VENV"/lib/python3*/site-packages/envoy/_bin/envoy)

cargo build --release --locked --quiet --bin portcullis --example pingora_floor --example pingora_stock
BIN=$ROOT/target/release/portcullis
FLOOR=$ROOT/target/release/examples/pingora_floor
STOCK=$ROOT/target/release/examples/pingora_stock

# ---- inputs ----------------------------------------------------------------
[[ -s $KEYS/jwks.json ]] || "$PY" "$BENCH/envoy/mint.py" genkeys --keys "$KEYS" >/dev/null
[[ -s $WORK/certs/gateway.crt ]] || "$BIN" certs dev --out "$WORK/certs" --jwks "$WORK/certs/dev-jwks.json" >/dev/null
# 50 tenants x 40 tokens, used in turn: each token's first use is a full
# RS256 verification, every later one a cache hit (the hit rate is reported).
[[ -s $WORK/tokens-mix.txt ]] || "$PY" "$BENCH/envoy/mint.py" mix 2000 --tenants 50 --keys "$KEYS" --ttl 86400 >"$WORK/tokens-mix.txt"
"$PY" "$BENCH/envoy/mint.py" --tenant acme --plan pro --org acme-org --keys "$KEYS" --ttl 86400 >"$WORK/tokens-acme.txt"
TOKEN_ACME=$(cat "$WORK/tokens-acme.txt")
python3 - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
def chat(size, stream=False):
    msg = {"model": "gpt-4o-mini", "max_tokens": 256, "stream": stream, "messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": ""}]}
    pad = size - len(json.dumps(msg, separators=(",", ":")))
    msg["messages"][1]["content"] = ("Why does the pipeline fail on Tuesdays? " * (size // 30 + 1))[:pad]
    return json.dumps(msg, separators=(",", ":"))
open(f"{work}/body-1k.json", "w").write(chat(1024))
# The 1 KiB prompt with one email and one card number in it, for masking.
pii = json.loads(chat(1024))
text = pii["messages"][1]["content"]
pii["messages"][1]["content"] = "Mail bob@example.com, card 4111 1111 1111 1111. " + text[:len(text) - 49]
open(f"{work}/body-pii-1k.json", "w").write(json.dumps(pii, separators=(",", ":")))
open(f"{work}/body-32k.json", "w").write(chat(32 * 1024))
open(f"{work}/body-sse.json", "w").write(chat(1024, stream=True))
# The same prompt in the Responses and the Anthropic dialect, 1 KiB each.
def same_size(body, field, size):
    pad = size - len(json.dumps(body, separators=(",", ":")))
    text = ("Why does the pipeline fail on Tuesdays? " * (size // 30 + 1))[:pad]
    field(body, text)
    return json.dumps(body, separators=(",", ":"))
def resp_input(b, t): b["input"][0]["content"] = t
def msg_input(b, t): b["messages"][0]["content"] = t
responses = {"model": "gpt-4o-mini", "max_output_tokens": 256, "instructions": "You are a concise assistant.",
             "input": [{"role": "user", "content": ""}]}
messages = {"model": "claude-sonnet-4", "max_tokens": 256, "system": "You are a concise assistant.",
            "messages": [{"role": "user", "content": ""}]}
open(f"{work}/body-responses-1k.json", "w").write(same_size(responses, resp_input, 1024))
open(f"{work}/body-messages-1k.json", "w").write(same_size(messages, msg_input, 1024))
PY

# ---- configs ---------------------------------------------------------------
render() {  # TEMPLATE OUT: fills @WORK@ and @KEYS@
  sed -e "s|@WORK@|$WORK|g" -e "s|@KEYS@|$KEYS|g" "$1" >"$2"
}
render "$BENCH/envoy/envoy-gateway.yaml.in" "$GEN/envoy-gateway.yaml"
render "$BENCH/envoy/proxy-nginx.conf.in" "$GEN/proxy-nginx.conf"

{
  cat <<'TOML'
# Every limit far above the load (like Envoy's 1M tokens/s bucket), except
# the 1 MiB body limit, which Envoy's buffer filter has too.
[plans.pro]
requests_per_second = 1_000_000
burst = 1_000_000
tokens_per_minute = 1_000_000_000_000
tokens_per_day = 1_000_000_000_000
max_concurrency = 100_000
max_body_bytes = 1_048_576
max_prompt_tokens = 1_000_000
max_output_tokens = 4_096
models = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4"]
features = ["chat", "stream", "responses", "messages"]
regions = ["us-east-1"]
TOML
  for t in acme globex $(seq -f "t%02g" 0 49); do
    printf '\n[[tenants]]\nid = "%s"\norg = "%s-org"\nplan = "pro"\n' "$t" "$t"
  done
} >"$GEN/tenants.toml"
# The same tenants with every detector masking and two deny rules.
{
  cat "$GEN/tenants.toml"
  cat <<'TOML'

[plans.pro.guardrails]
pii = "mask"
deny = ["(?i)ignore (all )?previous instructions", "BEGIN RSA PRIVATE KEY"]
TOML
} >"$GEN/tenants-guarded.toml"

portcullis_config() {  # NAME THREADS BACKEND [EXTRA] [SERVER_EXTRA] [TABLES] [TENANTS] -> path of gateway.toml
  local d=$GEN/$1
  mkdir -p "$d"
  cat >"$d/gateway.toml" <<TOML
[server]
listen = ["127.0.0.1:18010"]
threads = $2
region = "us-east-1"
grace_period_seconds = 0
graceful_shutdown_timeout_seconds = 1
pid_file = "$RUN/$1.pid"
upgrade_sock = "$RUN/$1.sock"
max_connections_per_ip = 0             # every client is 127.0.0.1 here
${5:-}

[server.tls]
listen = ["127.0.0.1:18443"]
cert = "$WORK/certs/gateway.crt"
key = "$WORK/certs/gateway.key"
client_ca = "$WORK/certs/ca.crt"
client_cert = "none"

[admin]
listen = "127.0.0.1:19010"

[upstream]
address = "127.0.0.1:18080"
connect_timeout_ms = 2000
read_timeout_ms = 300000

[auth.jwt]
issuer = "https://issuer.bench.local"
audiences = ["llm-gateway"]
jwks_file = "$KEYS/jwks.json"
tenant_claim = "tenant"

[limits]
backend = "$3"
redis_url = "redis://127.0.0.1:16379"
on_backend_error = "closed"

[policy]
tenants = "${7:-$GEN/tenants.toml}"
schemas = "$ROOT/policies/schemas"
${4:-}

[context]
signing_key_file = "$KEYS/context.key"
${6:-}
TOML
  echo "$d/gateway.toml"
}

# ---- processes -------------------------------------------------------------
start() {  # NAME CPUS CMD...: in the background, pinned unless CPUS is empty
  local name=$1 cpus=$2; shift 2
  if [[ -n $cpus ]]; then taskset -c "$cpus" "$@" >"$LOGS/$name.out" 2>&1 &
  else "$@" >"$LOGS/$name.out" 2>&1 & fi
  echo $! >"$RUN/$name.pid"
}
stop() {
  local f=$RUN/$1.pid pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f"); rm -f "$f"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
NAMES="router proxy redis"
cleanup() { for n in $NAMES; do stop "$n"; done; }
trap cleanup EXIT
wait_port() {
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "port $1 never opened; logs in $LOGS" >&2; return 1
}
start_router() {
  start router "$LOAD_CPU" "$BIN" mock-router --listen 127.0.0.1:18080 --threads 1 --stream-chunks 200
  wait_port 18080
}
start_redis() {
  start redis "$LOAD_CPU" redis-server --port 16379 --save '' --appendonly no
  wait_port 16379
}

# setup_case CASE: starts the proxy under test (and what it needs); sets
# PORT, SCHEME, DESC.
setup_case() {
  local c=$1 cpus=$PROXY_CPU
  SCHEME=http
  start_router
  case $c in
    direct) PORT=18080; DESC="load generator -> mock router";;
    nginx) start proxy "$cpus" "$NGINX" -p "$WORK/nginx-prefix" -c "$GEN/proxy-nginx.conf"
      PORT=18003; DESC="nginx proxy_pass, 1 worker";;
    pingora) start proxy "$cpus" "$FLOOR" 127.0.0.1:18020 127.0.0.1:18080
      PORT=18020; DESC="bare Pingora proxy, no policy, set up as Portcullis runs it (examples/pingora_floor.rs)";;
    pingora-stock) start proxy "$cpus" "$STOCK" 127.0.0.1:18020 127.0.0.1:18080
      PORT=18020; DESC="bare Pingora proxy, no policy, quick-start setup (examples/pingora_stock.rs)";;
    envoy-pass) start proxy "$cpus" "$ENVOY" -c "$BENCH/envoy/envoy-passthrough.yaml" --concurrency 1 \
        --disable-hot-restart --log-level warn
      PORT=18001; DESC="Envoy passthrough, --concurrency 1";;
    envoy-gw) start proxy "$cpus" "$ENVOY" -c "$GEN/envoy-gateway.yaml" --concurrency 1 \
        --disable-hot-restart --log-level warn
      PORT=18000; DESC="Envoy gateway config (jwt_authn, strip, local rate limit, buffer, json_to_metadata, Lua), --concurrency 1";;
    portcullis*|tls-*)
      local threads=1 backend=local extra="" server="" tables="" tenants="" log=${PORTCULLIS_LOG:-info}
      case $c in
        portcullis-proxyv2) server=$'proxy_protocol = "required"\ntrusted_proxies = ["127.0.0.1"]';;
        portcullis-nolog) log=warn;;
        portcullis-t2) threads=2; cpus="";;
        portcullis-redis) backend=redis; start_redis;;
        portcullis-rego) extra="rego = \"$ROOT/policies/authz.rego\"";;
        # Traces into the mock router's OTLP sink, or into a closed port.
        portcullis-trace-on) tables=$'[telemetry]\notlp_endpoint = "http://127.0.0.1:18080"';;
        portcullis-trace-dead) tables=$'[telemetry]\notlp_endpoint = "http://127.0.0.1:18999"';;
        portcullis-guarded*) tenants=$GEN/tenants-guarded.toml;;
      esac
      start proxy "$cpus" env PORTCULLIS_LOG="$log" "$BIN" serve -c "$(portcullis_config "$c" "$threads" "$backend" "$extra" "$server" "$tables" "$tenants")"
      PORT=18010; DESC="Portcullis, threads = $threads, limits $backend${extra:+, Rego}${tables:+, traced}${tenants:+, guardrails on}, log level $log (info writes the access log)"
      if [[ $c == tls-* ]]; then PORT=18443; SCHEME=https; fi;;
    *) echo "unknown case $c" >&2; return 1;;
  esac
  wait_port "$PORT"
}

# CPU seconds used so far by NAME's process and its children.
cpu_of() {
  local f=$RUN/$1.pid root t=0 p
  [[ -f $f ]] || { echo 0; return; }
  root=$(cat "$f")
  for p in $root $(pgrep -P "$root" | tr '\n' ' '); do
    [[ -r /proc/$p/stat ]] || continue
    t=$((t + $(sed 's/^.*) //' /proc/$p/stat | awk '{print $12 + $13}')))
  done
  echo "$t $(getconf CLK_TCK)" | awk '{printf "%.3f", $1 / $2}'
}
rss_kb() {  # NAME: resident KiB of the process and its children
  local root t=0 p
  root=$(cat "$RUN/$1.pid")
  for p in $root $(pgrep -P "$root" | tr '\n' ' '); do
    t=$((t + $(awk '/^VmRSS/{print $2}' /proc/"$p"/status 2>/dev/null || echo 0)))
  done
  echo "$t"
}

# sanity CASE URL TOKEN BODY: one request must be 200, where a gateway is
# in the path the router must have seen the tenant and no credential, and
# the guarded case must have masked its two findings.
sanity() {
  local h proxied=()
  [[ $1 == portcullis-proxyv2 ]] && proxied=(--haproxy-protocol)
  h=$(curl -sk "${proxied[@]}" -D - -o /dev/null -H 'content-type: application/json' -H "authorization: Bearer $3" \
        --data-binary @"$4" "$2" | tr -d '\r')
  [[ $(head -1 <<<"$h") == *" 200"* ]] || { echo "sanity FAILED for $1: $(head -1 <<<"$h")" >&2; return 1; }
  if [[ $1 == envoy-gw || $1 == portcullis* || $1 == tls-* ]]; then
    grep -qi '^x-echo-tenant-id: [a-z0-9]' <<<"$h" && grep -qi '^x-echo-authorization: absent$' <<<"$h" ||
      { echo "sanity FAILED for $1: the router saw no tenant or saw the credential" >&2; return 1; }
  fi
  if [[ $1 == portcullis-guarded-pii ]]; then
    grep -qi '^x-portcullis-pii-masked: 2$' <<<"$h" ||
      { echo "sanity FAILED for $1: the email and the card were not masked" >&2; return 1; }
  fi
}

# measure SCENARIO CASE BODY TOKENS [CLOSE]: closed loop with wrk; one row.
# ROUTE (default /v1/chat/completions) is the path the load goes to.
measure() {
  local scen=$1 c=$2 body=$3 tokens=$4 close=${5:-0} url res line p0 p1 l0 l1 t0 t1
  setup_case "$c"
  url="$SCHEME://127.0.0.1:$PORT${ROUTE:-/v1/chat/completions}"
  sanity "$c" "$url" "$(head -1 "$tokens")" "$body"
  # The warm-up uses another token, so every token of the mix is first
  # seen (and fully verified) in the measured run.
  BODY_FILE=$body TOKENS_FILE=$WORK/tokens-acme.txt CLOSE=$close taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" \
    -d"${WARMUP}s" -s "$BENCH/wrk-mix.lua" "$url" >/dev/null
  p0=$(cpu_of proxy); l0=$(cpu_of router); t0=$(date +%s.%N)
  res=$(BODY_FILE=$body TOKENS_FILE=$tokens CLOSE=$close taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" \
    -d"${DURATION}s" --timeout 5s -s "$BENCH/wrk-mix.lua" "$url")
  p1=$(cpu_of proxy); l1=$(cpu_of router); t1=$(date +%s.%N)
  line=$(sed -n 's/^RESULT //p' <<<"$res")
  [[ $c == direct ]] && { p0=$l0; p1=$l1; }
  python3 - "$scen" "$c" "$DESC" "$line" "$p0" "$p1" "$t0" "$t1" <<'PY' | tee -a "$OUT/raw.jsonl"
import json, sys
scen, case, desc, line, p0, p1, t0, t1 = sys.argv[1:]
r = json.loads(line)
cpu = float(p1) - float(p0)
r.update(scenario=scen, case=case, desc=desc, tool="wrk", proxy_cpu_s=round(cpu, 3),
         proxy_cpu_pct=round(100 * cpu / (float(t1) - float(t0)), 1),
         cpu_us_per_req=round(1e6 * cpu / max(r["requests"], 1), 1))
print(json.dumps(r))
PY
  cleanup
}

# fixed CASE: open loop at FIXED_QPS with oha (latency from the scheduled
# send, so a stall is not hidden), one token.
fixed() {
  local c=$1 url p0 p1
  setup_case "$c"
  url="http://127.0.0.1:$PORT/v1/chat/completions"
  sanity "$c" "$url" "$TOKEN_ACME" "$WORK/body-1k.json"
  taskset -c "$LOAD_CPU" "$OHA" -z "${WARMUP}s" -c "$CONNS" -q "$FIXED_QPS" --no-tui -m POST -D "$WORK/body-1k.json" \
    -H 'content-type: application/json' -H "authorization: Bearer $TOKEN_ACME" "$url" >/dev/null
  p0=$(cpu_of proxy)
  taskset -c "$LOAD_CPU" "$OHA" -z "${DURATION}s" -c "$CONNS" -q "$FIXED_QPS" --latency-correction --no-tui \
    --output-format json -m POST -D "$WORK/body-1k.json" -H 'content-type: application/json' \
    -H "authorization: Bearer $TOKEN_ACME" "$url" >"$RUN/oha.json"
  p1=$(cpu_of proxy)
  [[ $c == direct ]] && { p0=0; p1=0; }
  python3 - "$c" "$DESC" "$RUN/oha.json" "$p0" "$p1" "$DURATION" <<'PY' | tee -a "$OUT/raw.jsonl"
import json, sys
case, desc, path, p0, p1, dur = sys.argv[1:]
d = json.load(open(path))
s, p = d["summary"], d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
total = sum(int(v) for v in codes.values())
print(json.dumps({"scenario": "fixed", "case": case, "desc": desc, "tool": "oha",
    "requests": total, "rps": round(s["requestsPerSec"], 1), "err_status": total - int(codes.get("200", 0)),
    "p50_ms": round(p["p50"] * 1e3, 3), "p99_ms": round(p["p99"] * 1e3, 3), "p999_ms": round(p["p99.9"] * 1e3, 3),
    "proxy_cpu_pct": round(100 * (float(p1) - float(p0)) / float(dur), 1)}))
PY
  cleanup
}

# syscalls CASE: system calls per request over one closed-loop run, counted
# in the kernel on the syscall tracepoints for every thread of the proxy
# (perf stat counts; unlike strace it barely slows the proxy, so batching
# of epoll_wait and log writes stays as under the load measured above).
SYSCALLS="read recvfrom readv write writev sendto sendmsg recvmsg setsockopt getsockopt getpeername epoll_wait epoll_pwait epoll_ctl futex sched_yield accept4 close"
syscalls() {
  local c=$1 url pids events res line perf
  setup_case "$c"
  url="http://127.0.0.1:$PORT/v1/chat/completions"
  sanity "$c" "$url" "$TOKEN_ACME" "$WORK/body-1k.json"
  BODY_FILE=$WORK/body-1k.json TOKENS_FILE=$WORK/tokens-acme.txt taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" \
    -d"${WARMUP}s" -s "$BENCH/wrk-mix.lua" "$url" >/dev/null
  pids=$(cat "$RUN/proxy.pid"); pids="$pids$( (pgrep -P "$pids" || true) | sed 's/^/,/' | tr -d '\n')"
  events=raw_syscalls:sys_enter$(for n in $SYSCALLS; do printf ',syscalls:sys_enter_%s' "$n"; done)
  perf stat -x, -e "$events" -p "$pids" -o "$RUN/perf-stat.csv" &
  perf=$!
  sleep 0.2
  res=$(BODY_FILE=$WORK/body-1k.json TOKENS_FILE=$WORK/tokens-mix.txt taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" \
    -d"${DURATION}s" --timeout 5s -s "$BENCH/wrk-mix.lua" "$url")
  kill -INT "$perf"; wait "$perf" 2>/dev/null || true
  line=$(sed -n 's/^RESULT //p' <<<"$res")
  python3 - "$c" "$DESC" "$line" "$RUN/perf-stat.csv" <<'PY' | tee -a "$OUT/raw.jsonl"
import json, sys
case, desc, line, path = sys.argv[1:]
r = json.loads(line)
counts = {}
for row in open(path):
    f = row.strip().split(",")
    if len(f) > 2 and f[0].isdigit():
        counts[f[2].split(":")[1].removeprefix("sys_enter_")] = int(f[0])
n = max(r["requests"], 1)
total = counts.pop("sys_enter", 0)
per = {k: round(v / n, 2) for k, v in sorted(counts.items()) if v}
per["other"] = round((total - sum(counts.values())) / n, 2)
print(json.dumps({"scenario": "syscalls", "case": case, "desc": desc, "requests": r["requests"],
    "rps": r["rps"], "syscalls_per_req": round(total / n, 2), "by_syscall": per}))
PY
  cleanup
}

# rss CASE: resident memory before and with IDLE_CONNS idle keep-alive connections.
rss() {
  local c=$1 before after ready
  ulimit -n "$(ulimit -Hn)"   # the client and the proxy each hold IDLE_CONNS sockets
  setup_case "$c"
  sanity "$c" "http://127.0.0.1:$PORT/v1/chat/completions" "$TOKEN_ACME" "$WORK/body-1k.json"
  sleep 1; before=$(rss_kb proxy)
  taskset -c "$LOAD_CPU" python3 "$BENCH/idle_conns.py" "$PORT" "$IDLE_CONNS" "$TOKEN_ACME" 120 >"$RUN/idle.out" 2>&1 &
  local idle=$!
  for _ in $(seq 600); do grep -q '^ready' "$RUN/idle.out" && break; sleep 0.2; done
  sleep 2; after=$(rss_kb proxy); ready=$(grep '^ready' "$RUN/idle.out" || echo "ready 0 0")
  kill "$idle" 2>/dev/null || true; wait "$idle" 2>/dev/null || true
  python3 - "$c" "$DESC" "$before" "$after" "$ready" <<'PY' | tee -a "$OUT/raw.jsonl"
import json, sys
case, desc, before, after, ready = sys.argv[1:]
_, held, answered = ready.split()
print(json.dumps({"scenario": "rss", "case": case, "desc": desc, "rss_before_kib": int(before),
    "rss_after_kib": int(after), "connections": int(held), "answered": int(answered),
    "kib_per_conn": round((int(after) - int(before)) / max(int(held), 1), 2)}))
PY
  cleanup
}

{
  echo "date: $(date -Is)"
  echo "host: $(uname -srm), $(nproc) vCPU, $(lscpu | sed -n 's/^Model name: *//p')"
  echo "envoy: $("$ENVOY" --version | sed -n 's/.*version: \([^ ]*\).*/\1/p'); $("$NGINX" -v 2>&1); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); oha $("$OHA" --version | cut -d' ' -f2)"
  echo "params: DURATION=$DURATION WARMUP=$WARMUP CONNS=$CONNS REPS=$REPS FIXED_QPS=$FIXED_QPS IDLE_CONNS=$IDLE_CONNS PROXY_CPU=$PROXY_CPU LOAD_CPU=$LOAD_CPU"
} | tee "$OUT/env.txt"
cleanup

MIX=$WORK/tokens-mix.txt; ACME=$WORK/tokens-acme.txt
for rep in $(seq "$REPS"); do
  for s in $SCENARIOS; do
    case $s in
      1k) for c in direct nginx pingora-stock pingora envoy-pass envoy-gw portcullis portcullis-nolog; do
            tok=$MIX; [[ $c == envoy-gw ]] && tok=$ACME
            measure 1k "$c" "$WORK/body-1k.json" "$tok"
          done;;
      32k) for c in direct envoy-gw portcullis; do
             tok=$MIX; [[ $c == envoy-gw ]] && tok=$ACME
             measure 32k "$c" "$WORK/body-32k.json" "$tok"
           done;;
      sse) for c in direct envoy-pass portcullis; do measure sse "$c" "$WORK/body-sse.json" "$MIX"; done;;
      tls) measure tls portcullis "$WORK/body-1k.json" "$MIX"
           measure tls tls-keepalive "$WORK/body-1k.json" "$MIX"
           measure tls tls-newconn "$WORK/body-1k.json" "$MIX" 1;;
      redis) for c in portcullis portcullis-redis; do measure redis "$c" "$WORK/body-1k.json" "$MIX"; done;;
      rego) for c in portcullis portcullis-rego; do measure rego "$c" "$WORK/body-1k.json" "$MIX"; done;;
      threads) measure threads portcullis "$WORK/body-1k.json" "$MIX"
               measure threads portcullis-t2 "$WORK/body-1k.json" "$MIX";;
      # PROXY v2 costs once per connection: measured where it costs most,
      # one request per connection, against the same without a header.
      proxy) measure proxy portcullis-newconn "$WORK/body-1k.json" "$MIX" 1
             PROXY_V2=1 measure proxy portcullis-proxyv2 "$WORK/body-1k.json" "$MIX" 1;;
      # Tracing off, on at ratio 1.0 (into the mock router's sink), and on
      # with nothing listening at the collector's address.
      tracing) for c in portcullis portcullis-trace-on portcullis-trace-dead; do
                 measure tracing "$c" "$WORK/body-1k.json" "$MIX"
               done;;
      # Every detector masking plus two deny rules, on a clean prompt and
      # on one with an email and a card number to mask, against none.
      guardrails) measure guardrails portcullis "$WORK/body-1k.json" "$MIX"
                  measure guardrails portcullis-guarded "$WORK/body-1k.json" "$MIX"
                  measure guardrails portcullis-guarded-pii "$WORK/body-pii-1k.json" "$MIX";;
      dialects) measure dialects portcullis-chat "$WORK/body-1k.json" "$MIX"
                ROUTE=/v1/responses measure dialects portcullis-responses "$WORK/body-responses-1k.json" "$MIX"
                ROUTE=/v1/messages measure dialects portcullis-messages "$WORK/body-messages-1k.json" "$MIX";;
      syscalls) for c in ${SYSCALL_CASES:-nginx pingora-stock pingora envoy-pass portcullis portcullis-nolog}; do syscalls "$c"; done;;
      fixed|rss) ;;
      *) echo "unknown scenario $s" >&2; exit 2;;
    esac
  done
done
if [[ " $SCENARIOS " == *" fixed "* ]]; then
  for c in direct nginx envoy-pass envoy-gw portcullis; do fixed "$c"; done
fi
if [[ " $SCENARIOS " == *" rss "* ]]; then
  for c in envoy-gw portcullis; do rss "$c"; done
fi
python3 "$BENCH/compare_report.py" "$OUT/raw.jsonl" | tee "$OUT/results.md"
echo "raw: $OUT/raw.jsonl  table: $OUT/results.md"
