#!/usr/bin/env bash
# Interleaved A/B of two gateway builds on the 1 KiB full path: CPU µs per
# request, A and B in turn ROUNDS times, so the box's drift hits both alike.
# This is how each line of bench/RESULTS.md "What each change bought" is
# measured. It reuses the inputs bench/compare.sh generates, so run that
# once first (SCENARIOS=1k REPS=1 is enough).
#
#   cp target/release/portcullis /tmp/portcullis-a   # before the change
#   cargo build --release && bench/ab.sh /tmp/portcullis-a target/release/portcullis
#
# Env: ROUNDS=5 DURATION=8 WARMUP=2 CONNS=50 PROXY_CPU=0 LOAD_CPU=1
#      BENCH_WORK=<compare.sh's scratch dir>  BODY=<request body file>
#      (BODY=$BENCH_WORK/body-sse.json gets compare.sh's 200-event stream)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# == 2 ]] || { echo "usage: bench/ab.sh BINARY_A BINARY_B" >&2; exit 2; }
A=$(realpath "$1"); B=$(realpath "$2")
WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/portcullis-bench}
ROUNDS=${ROUNDS:-5}; DURATION=${DURATION:-8}; WARMUP=${WARMUP:-2}; CONNS=${CONNS:-50}
PROXY_CPU=${PROXY_CPU:-0}; LOAD_CPU=${LOAD_CPU:-1}
BODY=${BODY:-$WORK/body-1k.json}
CONFIG=$WORK/gen/portcullis/gateway.toml
for f in "$CONFIG" "$BODY" "$WORK/tokens-mix.txt" "$WORK/tokens-acme.txt"; do
  [[ -s $f ]] || { echo "missing $f: run SCENARIOS=1k REPS=1 bench/compare.sh first" >&2; exit 1; }
done
URL=http://127.0.0.1:18010/v1/chat/completions

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_port() {
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "port $1 never opened" >&2; return 1
}
cpu_s() { sed 's/^.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($12 + $13) / hz}'; }

taskset -c "$LOAD_CPU" "$A" mock-router --listen 127.0.0.1:18080 --threads 1 --stream-chunks 200 >/dev/null 2>&1 &
pids+=($!)
wait_port 18080

# one BINARY: prints "µs/req req/s" for one measured run.
one() {
  local bin=$1 pid c0 c1 res
  taskset -c "$PROXY_CPU" env PORTCULLIS_LOG=info "$bin" serve -c "$CONFIG" >/dev/null 2>&1 &
  pid=$!
  wait_port 18010
  BODY_FILE=$BODY TOKENS_FILE=$WORK/tokens-acme.txt taskset -c "$LOAD_CPU" \
    wrk -t1 -c"$CONNS" -d"${WARMUP}s" -s bench/wrk-mix.lua "$URL" >/dev/null
  c0=$(cpu_s "$pid")
  res=$(BODY_FILE=$BODY TOKENS_FILE=$WORK/tokens-mix.txt taskset -c "$LOAD_CPU" \
    wrk -t1 -c"$CONNS" -d"${DURATION}s" -s bench/wrk-mix.lua "$URL" | sed -n 's/^RESULT //p')
  c1=$(cpu_s "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); c=float(sys.argv[3])-float(sys.argv[2])
bad=r["err_status"]+r["err_read"]+r["err_write"]+r["err_connect"]+r["err_timeout"]
assert bad == 0, f"{bad} failed requests"
print("%.1f %.0f" % (1e6 * c / r["requests"], r["rps"]))' "$res" "$c0" "$c1"
}

declare -a ra rb
for i in $(seq "$ROUNDS"); do
  a=$(one "$A"); b=$(one "$B")
  ra+=("${a%% *}"); rb+=("${b%% *}")
  echo "round $i: A ${a% *} µs/req (${a#* } req/s)  B ${b% *} µs/req (${b#* } req/s)"
done
python3 - "${ra[*]}" "${rb[*]}" <<'PY'
import statistics, sys
a = [float(x) for x in sys.argv[1].split()]
b = [float(x) for x in sys.argv[2].split()]
ma, mb = statistics.median(a), statistics.median(b)
print(f"median A {ma:.1f} µs/req, B {mb:.1f} µs/req: B/A = {mb / ma:.3f}")
PY
