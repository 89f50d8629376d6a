#!/usr/bin/env bash
# Zero-downtime binary upgrade outside systemd (what ExecReload does):
#   deploy/upgrade.sh [-b /path/to/new/portcullis] -c /etc/portcullis/gateway.toml
# The new binary's config is checked first; then the running process (from
# the pid file) hands its listening sockets over and drains, and the new
# process takes them with -u.
set -euo pipefail
BIN=portcullis
CONF=
while getopts "b:c:" opt; do
  case $opt in
    b) BIN=$OPTARG ;;
    c) CONF=$OPTARG ;;
    *) echo "usage: $0 [-b BIN] -c gateway.toml" >&2; exit 2 ;;
  esac
done
[ -n "$CONF" ] || { echo "usage: $0 [-b BIN] -c gateway.toml" >&2; exit 2; }

"$BIN" check -c "$CONF" >/dev/null
PID_FILE=$(sed -n 's/^pid_file *= *"\(.*\)".*/\1/p' "$CONF" | head -n1)
PID_FILE=${PID_FILE:-/run/portcullis/portcullis.pid}
OLD=$(cat "$PID_FILE")
kill -0 "$OLD"
kill -QUIT "$OLD"
"$BIN" serve -d -u -c "$CONF"
for _ in $(seq 100); do
  NEW=$(cat "$PID_FILE" 2>/dev/null || true)
  [ -n "$NEW" ] && [ "$NEW" != "$OLD" ] && kill -0 "$NEW" 2>/dev/null && { echo "upgraded: $OLD -> $NEW"; exit 0; }
  sleep 0.1
done
echo "the new process did not come up" >&2
exit 1
