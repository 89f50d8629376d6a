#!/usr/bin/env python3
"""The table bench/compare.sh prints: medians per scenario and case, then
each target of issue 9 as a ratio measured in the same run.

  compare_report.py RAW_JSONL
"""
import json
import statistics
import sys
from collections import defaultdict

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
groups = defaultdict(list)
for r in rows:
    groups[(r["scenario"], r["case"])].append(r)


def med(scenario, case, key):
    vals = [r[key] for r in groups.get((scenario, case), []) if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v, digits=1):
    return "–" if v is None else f"{v:,.{digits}f}"


out = []
scenarios = []
for s, _ in groups:
    if s not in scenarios:
        scenarios.append(s)

for s in scenarios:
    if s in ("fixed", "rss", "syscalls"):
        continue
    out.append(f"\n### {s} (wrk, closed loop)\n")
    out.append("| case | req/s | proxy CPU µs/req | proxy CPU % | p50 ms | p99 ms | p99.9 ms | errors | runs |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (sc, c), rs in groups.items():
        if sc != s:
            continue
        errs = sum(r.get("err_status", 0) + r.get("err_connect", 0) + r.get("err_read", 0)
                   + r.get("err_write", 0) + r.get("err_timeout", 0) for r in rs)
        out.append(f"| {c} | {fmt(med(s, c, 'rps'), 0)} | {fmt(med(s, c, 'cpu_us_per_req'))} | "
                   f"{fmt(med(s, c, 'proxy_cpu_pct'), 0)} | {fmt(med(s, c, 'p50_ms'), 2)} | "
                   f"{fmt(med(s, c, 'p99_ms'), 2)} | {fmt(med(s, c, 'p999_ms'), 2)} | {errs} | {len(rs)} |")

if any(s == "fixed" for s, _ in groups):
    out.append("\n### fixed offered load (oha -q, latency-corrected)\n")
    out.append("| case | req/s | p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms | proxy CPU % |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    d50, d99 = med("fixed", "direct", "p50_ms"), med("fixed", "direct", "p99_ms")
    for (s, c), rs in groups.items():
        if s != "fixed":
            continue
        p50, p99 = med(s, c, "p50_ms"), med(s, c, "p99_ms")
        add50 = None if c == "direct" or d50 is None else p50 - d50
        add99 = None if c == "direct" or d99 is None else p99 - d99
        out.append(f"| {c} | {fmt(med(s, c, 'rps'), 0)} | {fmt(p50, 3)} | {fmt(p99, 3)} | "
                   f"{fmt(med(s, c, 'p999_ms'), 3)} | {fmt(add50, 3)} | {fmt(add99, 3)} | "
                   f"{fmt(med(s, c, 'proxy_cpu_pct'), 0)} |")

if any(s == "rss" for s, _ in groups):
    out.append("\n### memory with idle keep-alive connections\n")
    out.append("| case | connections held | RSS before MiB | RSS after MiB | KiB per connection |")
    out.append("|---|---:|---:|---:|---:|")
    for (s, c), rs in groups.items():
        if s != "rss":
            continue
        r = rs[-1]
        out.append(f"| {c} | {r['connections']:,} | {r['rss_before_kib'] / 1024:.1f} | "
                   f"{r['rss_after_kib'] / 1024:.1f} | {r['kib_per_conn']:.1f} |")

if any(s == "syscalls" for s, _ in groups):
    out.append("\n### system calls per request (perf stat on the syscall tracepoints, every thread)\n")
    names = sorted({k for (s, _), rs in groups.items() if s == "syscalls" for r in rs for k in r["by_syscall"]})
    out.append("| case | req/s | syscalls/req | " + " | ".join(names) + " |")
    out.append("|---|---:|---:|" + "---:|" * len(names))
    for (s, c), rs in groups.items():
        if s != "syscalls":
            continue
        by = {k: statistics.median([r["by_syscall"].get(k, 0) for r in rs]) for k in names}
        out.append(f"| {c} | {fmt(med(s, c, 'rps'), 0)} | {fmt(med(s, c, 'syscalls_per_req'), 2)} | "
                   + " | ".join("" if not by[k] else f"{by[k]:.2f}" for k in names) + " |")

out.append("\n### targets (ratios from this run)\n")
out.append("| target | measured | met |")
out.append("|---|---|---|")


def target(name, value, ok, text):
    if value is None:
        out.append(f"| {name} | not measured | – |")
    else:
        out.append(f"| {name} | {text} | {'yes' if ok else 'no'} |")


pc, gw = med("1k", "portcullis", "cpu_us_per_req"), med("1k", "envoy-gw", "cpu_us_per_req")
if pc and gw:
    target("CPU/req ≤ 0.5 × Envoy gateway (1 KiB)", pc / gw, pc / gw <= 0.5,
           f"{pc:.1f} / {gw:.1f} µs = {pc / gw:.2f}×")
    rp, rg = med("1k", "portcullis", "rps"), med("1k", "envoy-gw", "rps")
    target("req/s ≥ 2 × Envoy gateway on one core (1 KiB)", rp / rg, rp / rg >= 2,
           f"{rp:,.0f} / {rg:,.0f} = {rp / rg:.2f}×")
pc32, gw32 = med("32k", "portcullis", "cpu_us_per_req"), med("32k", "envoy-gw", "cpu_us_per_req")
if pc32 and gw32:
    target("CPU/req vs Envoy gateway (32 KiB)", pc32 / gw32, pc32 / gw32 <= 0.5,
           f"{pc32:.1f} / {gw32:.1f} µs = {pc32 / gw32:.2f}×")
p99, g99 = med("fixed", "portcullis", "p99_ms"), med("fixed", "envoy-gw", "p99_ms")
if p99 and g99:
    target(f"p99 at the fixed load ≤ Envoy gateway's", p99 / g99, p99 <= g99,
           f"{p99:.3f} vs {g99:.3f} ms")
ng = med("1k", "nginx", "cpu_us_per_req")
if pc and ng:
    target("CPU/req ≤ 1.6 × nginx plain proxy (1 KiB)", pc / ng, pc / ng <= 1.6, f"{pc:.1f} / {ng:.1f} µs = {pc / ng:.2f}×")
    target("stretch: CPU/req ≤ 1.5 × nginx plain proxy", pc / ng, pc / ng <= 1.5, f"{pc / ng:.2f}×")
if pc and gw:
    target("CPU/req ≤ 0.4 × Envoy gateway (1 KiB)", pc / gw, pc / gw <= 0.4, f"{pc / gw:.2f}×")
ep = med("1k", "envoy-pass", "cpu_us_per_req")
if pc and ep:
    target("CPU/req ≤ 0.8 × Envoy passthrough (1 KiB)", pc / ep, pc / ep <= 0.8, f"{pc:.1f} / {ep:.1f} µs = {pc / ep:.2f}×")
sp, sn = med("syscalls", "portcullis", "syscalls_per_req"), med("syscalls", "nginx", "syscalls_per_req")
if sp and sn:
    target("syscalls/req ≤ nginx's + 1", sp - sn, sp <= sn + 1, f"{sp:.2f} vs {sn:.2f}")
pe99 = med("fixed", "envoy-pass", "p99_ms")
if p99 and pe99:
    target("p99 at the fixed load ≤ Envoy passthrough's", p99 / pe99, p99 <= pe99, f"{p99:.3f} vs {pe99:.3f} ms")
rss_pc = [r["kib_per_conn"] for (s, c), rs in groups.items() if s == "rss" and c == "portcullis" for r in rs]
if rss_pc:
    target("idle keep-alive connection ≤ 24 KiB", rss_pc[-1], rss_pc[-1] <= 24, f"{rss_pc[-1]:.1f} KiB")
def paired(scen, base, case, name, limit):
    """`case` against `base` of the same scenario, paired per repetition
    (they run back to back), then the median of those ratios: the box's
    drift between repetitions cancels out."""
    runs = {c: [r["cpu_us_per_req"] for r in groups.get((scen, c), [])] for c in (base, case)}
    ratios = [x / b for x, b in zip(runs[case], runs[base]) if b]
    if ratios:
        ratio = statistics.median(ratios)
        target(name, ratio, ratio <= limit, f"{ratio:.2f}× (runs: {', '.join(f'{x:.2f}' for x in ratios)})")
# The ratio targets again, paired per repetition: within a repetition the
# cases run back to back, so drift between repetitions cancels out.
for base, name, limit in (("nginx", "1.6 × nginx plain proxy", 1.6),
                          ("envoy-gw", "0.4 × Envoy gateway", 0.4),
                          ("envoy-pass", "0.8 × Envoy passthrough", 0.8)):
    paired("1k", base, "portcullis", f"CPU/req ≤ {name} (1 KiB, paired per repetition)", limit)
for dialect in ("responses", "messages"):
    paired("dialects", "portcullis-chat", f"portcullis-{dialect}",
           f"{dialect} CPU/req within 10 % of chat (1 KiB, paired per repetition)", 1.10)
# PROXY v2 against the same new-connection load without a header.
paired("proxy", "portcullis-newconn", "portcullis-proxyv2",
       "PROXY v2 CPU/req within noise (5 %) of none, one request per connection", 1.05)
# Tracing on (a sink that accepts, and a closed port) against off.
for case, what in (("portcullis-trace-on", "on, ratio 1.0"), ("portcullis-trace-dead", "on, dead collector")):
    paired("tracing", "portcullis", case, f"tracing {what}: CPU/req ≤ 1.15 × off (1 KiB)", 1.15)
# Guardrails on (a clean prompt, and one with findings to mask) against off.
for case, what in (("portcullis-guarded", "clean prompt"), ("portcullis-guarded-pii", "email and card masked")):
    paired("guardrails", "portcullis", case,
           f"guardrails, every detector, {what}: CPU/req ≤ 1.25 × off (1 KiB)", 1.25)
fl, st = med("1k", "pingora", "cpu_us_per_req"), med("1k", "pingora-stock", "cpu_us_per_req")
if pc and fl:
    out.append(f"\nBare Pingora (no policy, set up as Portcullis runs it) costs {fl:.1f} µs/req here"
               + (f" ({st:.1f} µs in its quick-start setup)" if st else "")
               + f": the policy path adds {pc - fl:.1f} µs.")
reqs = sum(r["requests"] for (s, c), rs in groups.items() if s == "1k" and c == "portcullis" for r in rs)
if reqs:
    out.append(f"Token mix: 2,000 tokens over 50 tenants, used in turn; each token's first use is a full "
               f"RS256 verification: {2000 * len(groups[('1k', 'portcullis')]):,} misses in "
               f"{reqs:,} measured requests: a token-cache hit rate of "
               f"{100 * (1 - 2000 * len(groups[('1k', 'portcullis')]) / reqs):.1f}% (the warm-up uses another token).")
print("\n".join(out))
