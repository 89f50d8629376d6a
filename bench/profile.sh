#!/usr/bin/env bash
# A CPU profile of the gateway on the 1 KiB full path at saturation, as a
# flame graph: perf samples with DWARF call stacks (Rust's .eh_frame, so
# the release binary needs no debug info), folded by inferno. It reuses the
# inputs bench/compare.sh generates (run SCENARIOS=1k REPS=1 once first).
#
#   bench/profile.sh OUT.svg            # 5 s of samples at 499 Hz
#
# Env: SECONDS_SAMPLED=5 CONNS=50 PROXY_CPU=0 LOAD_CPU=1 BENCH_WORK=<scratch>
#      BIN=target/release/portcullis
# Also writes OUT.folded (the folded stacks, to sum by component) beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# == 1 ]] || { echo "usage: bench/profile.sh OUT.svg" >&2; exit 2; }
OUT=$(realpath -m "$1")
WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/portcullis-bench}
BIN=$(realpath "${BIN:-target/release/portcullis}")
SAMPLED=${SECONDS_SAMPLED:-5}; CONNS=${CONNS:-50}
PROXY_CPU=${PROXY_CPU:-0}; LOAD_CPU=${LOAD_CPU:-1}
CONFIG=$WORK/gen/portcullis/gateway.toml
INFERNO=$WORK/cargo-root/bin
for f in "$CONFIG" "$WORK/body-1k.json" "$WORK/tokens-mix.txt" "$WORK/tokens-acme.txt"; do
  [[ -s $f ]] || { echo "missing $f: run SCENARIOS=1k REPS=1 bench/compare.sh first" >&2; exit 1; }
done
[[ -x $INFERNO/inferno-flamegraph ]] ||
  cargo install inferno --locked --version 0.12.8 --root "$WORK/cargo-root" >"$WORK/cargo-inferno.log" 2>&1
URL=http://127.0.0.1:18010/v1/chat/completions

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_port() {
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "port $1 never opened" >&2; return 1
}
taskset -c "$LOAD_CPU" "$BIN" mock-router --listen 127.0.0.1:18080 --threads 1 >/dev/null 2>&1 &
pids+=($!)
wait_port 18080
taskset -c "$PROXY_CPU" env PORTCULLIS_LOG=info "$BIN" serve -c "$CONFIG" >/dev/null 2>&1 &
gw=$!; pids+=($gw)
wait_port 18010
BODY_FILE=$WORK/body-1k.json TOKENS_FILE=$WORK/tokens-acme.txt taskset -c "$LOAD_CPU" \
  wrk -t1 -c"$CONNS" -d2s -s bench/wrk-mix.lua "$URL" >/dev/null
BODY_FILE=$WORK/body-1k.json TOKENS_FILE=$WORK/tokens-mix.txt taskset -c "$LOAD_CPU" \
  wrk -t1 -c"$CONNS" -d"$((SAMPLED + 2))s" -s bench/wrk-mix.lua "$URL" >/dev/null &
load=$!
sleep 1
perf record -q -F 499 --call-graph dwarf,16384 -p "$gw" -o "$WORK/perf.data" -- sleep "$SAMPLED" 2>/dev/null
wait "$load"
perf script -i "$WORK/perf.data" 2>/dev/null | "$INFERNO/inferno-collapse-perf" >"${OUT%.svg}.folded"
"$INFERNO/inferno-flamegraph" --title "Portcullis, 1 KiB full path, $(date -I)" <"${OUT%.svg}.folded" >"$OUT"
echo "flame graph: $OUT"
