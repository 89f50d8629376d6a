#!/usr/bin/env bash
# Runs the body-stage Criterion bench and prints, per body size, the whole
# stage's time against a plain serde_json parse of the same bytes (target:
# at most 3x). Both are measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench body -- --warm-up-time "${WARMUP:-2}" --measurement-time "${MEASURE:-5}" >/dev/null 2>&1
python3 - <<'PY'
import json
base = "target/criterion/body_stage"
mean = lambda case, size: json.load(open(f"{base}/{case}/{size}/new/estimates.json"))["mean"]["point_estimate"] / 1000
print("| body | serde_json::Value µs | body stage µs | ratio |")
print("|---|---:|---:|---:|")
for size in ("1KiB", "32KiB", "256KiB"):
    plain, stage = mean("serde_json_value", size), mean("judge", size)
    print(f"| {size} | {plain:.1f} | {stage:.1f} | {stage / plain:.2f}x |")
PY
