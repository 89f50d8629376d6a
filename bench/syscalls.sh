#!/usr/bin/env bash
# System calls per request for nginx, bare Pingora (stock and as Portcullis
# runs it), Envoy's passthrough and Portcullis (access log on and off), on
# the 1 KiB closed-loop load: bench/compare.sh's `syscalls` scenario alone.
# Counted with `perf stat` on the syscall tracepoints of every thread of
# the proxy, divided by the requests wrk completed in the same window.
#
#   bench/syscalls.sh                 # REPS=1 DURATION=10
#   REPS=3 SKIP_SETUP=1 bench/syscalls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIOS=syscalls REPS=${REPS:-1} exec bench/compare.sh
