#!/usr/bin/env bash
# Runs the body-stage Criterion bench and prints, per body size, the whole
# stage's time against a plain serde_json parse of the same bytes (target:
# at most 3x), then the stage with every guardrail detector on against the
# stage without, with the guardrails' own cost per KiB of body (linear: the
# same at every size). All are measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench body -- --warm-up-time "${WARMUP:-2}" --measurement-time "${MEASURE:-5}" >/dev/null 2>&1
python3 - <<'PY'
import json
base = "target/criterion/body_stage"
mean = lambda case, size: json.load(open(f"{base}/{case}/{size}/new/estimates.json"))["mean"]["point_estimate"] / 1000
print("| body | serde_json::Value µs | body stage µs | ratio |")
print("|---|---:|---:|---:|")
sizes = {"1KiB": 1, "32KiB": 32, "256KiB": 256, "1MiB": 1024}
for size in sizes:
    plain, stage = mean("serde_json_value", size), mean("judge", size)
    print(f"| {size} | {plain:.1f} | {stage:.1f} | {stage / plain:.2f}x |")
print()
print("| body | body stage µs | with every guardrail µs | ratio | guardrails µs per KiB |")
print("|---|---:|---:|---:|---:|")
for size, kib in sizes.items():
    stage, guarded = mean("judge", size), mean("judge_guarded", size)
    print(f"| {size} | {stage:.1f} | {guarded:.1f} | {guarded / stage:.2f}x | {(guarded - stage) / kib:.2f} |")
PY
