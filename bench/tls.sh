#!/usr/bin/env bash
# TLS cost on the tenant side: the same 1 KiB chat request over plaintext
# keep-alive, TLS keep-alive, and a new TLS connection (full handshake) per
# request, against one gateway pinned to one core, in one run.
#
#   bench/tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

gateway tls 18030 19030 '[server.tls]
listen = ["127.0.0.1:18443"]
cert = "certs/gateway.crt"
key = "certs/gateway.key"
client_cert = "none"'
TOK=$(token acme)
measure plaintext-keepalive "http://127.0.0.1:18030/v1/chat/completions" "$TOK" "$GW_PID"
measure tls-keepalive "https://127.0.0.1:18443/v1/chat/completions" "$TOK" "$GW_PID"
CLOSE=1 measure tls-handshake-per-request "https://127.0.0.1:18443/v1/chat/completions" "$TOK" "$GW_PID"

{
  echo "TLS: 1 KiB chat body, $CONNECTIONS connections, $DURATION s per case; gateway pinned to one core (ECDSA P-256 certificate, TLS 1.3)."
  echo
  table plaintext-keepalive tls-keepalive tls-handshake-per-request
  python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
rows = {r["case"]: r for r in map(json.loads, open(sys.argv[1]))}
p, k, h = rows["plaintext-keepalive"], rows["tls-keepalive"], rows["tls-handshake-per-request"]
print(f"\nTLS keep-alive / plaintext throughput: {k['rps'] / p['rps']:.2f}; "
      f"full handshakes per second (one per request): {h['rps']:,.0f} "
      f"({h['gateway_cpu_us_per_req']} µs of gateway CPU each, request included)")
PY
} | tee "$OUT/tls.md"
echo "results: $OUT"
