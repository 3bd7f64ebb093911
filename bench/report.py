"""Render bench/results/latest.json into docs/benchmarks.md and docs/reliability.md (tables,
machine, date, notes)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

# A part's figures as bench/results/latest.json holds them (JSON: keys per part, see bench/run.py).
Figures = dict[str, Any]

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
RELIABILITY_DOC = REPO / "docs" / "reliability.md"


def machine() -> Figures:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    try:
        # tracked files changed but not committed (others' work in a shared checkout, or ours)
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        )
    except (OSError, subprocess.TimeoutExpired):
        dirty = False
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "loadavg": os.getloadavg(),
    }


def _f(v: object, digits: int = 0, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _ratio(b: float | None, m: float | None, digits: int = 1) -> str:
    if b is None or m is None:
        return ""
    if m == 0:
        return "" if b == 0 else "∞"
    return f"×{b / m:.{digits}f}"


def detect_cell(r: Figures) -> str:
    if r.get("detect_of"):  # a drill whose detection is of something else than an engine (its row says what)
        return "never" if r["detect_s"] is None else f"{r['detect_s']:.1f}"
    if not r.get("engine_fault"):
        return "n/a"
    return "never" if r["detect_s"] is None else f"{r['detect_s']:.1f}"


def drill_table(rows: list[Figures]) -> list[str]:
    """Mesh and baseline side by side, one block per scenario, plus a ratio line (baseline / mesh)."""
    out = [
        "| scenario | system | requests | failed | truncated | stalled | longest wait s | p50 ms | p99 ms | "
        "TTFT p50 ms | TTFT p99 ms | detect s | recover s |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    by_scenario: dict[str, dict[str, Figures]] = {}
    for row in rows:
        by_scenario.setdefault(row["scenario"], {})[row["system"]] = row
    for scenario, systems in by_scenario.items():
        for name in ("mesh", "baseline"):
            r = systems.get(name)
            if r is None:
                continue
            out.append(
                f"| {scenario} | {name} | {r['requests']} | {r['failed']} | {r['truncated']} | "
                f"{r.get('stalled', '—')} | {_f(r.get('longest_wait_s'), 1)} | {_f(r['p50_ms'])} | "
                f"{_f(r['p99_ms'])} | {_f(r['ttft_p50_ms'])} | "
                f"{_f(r['ttft_p99_ms'])} | {detect_cell(r)} | {_f(r['recover_s'], 1)} |"
            )
        m, b = systems.get("mesh"), systems.get("baseline")
        if m and b:
            never_detected = m.get("engine_fault") and b["detect_s"] is None and m["detect_s"] is not None
            out.append(
                f"| {scenario} | *baseline ÷ mesh* | {_ratio(b['requests'], m['requests'], 2)} | "
                f"{_ratio(b['failed'], m['failed'])} | {_ratio(b['truncated'], m['truncated'])} | "
                f"{_ratio(b.get('stalled'), m.get('stalled'))} | "
                f"{_ratio(b.get('longest_wait_s'), m.get('longest_wait_s'))} | "
                f"{_ratio(b['p50_ms'], m['p50_ms'], 2)} | "
                f"{_ratio(b['p99_ms'], m['p99_ms'])} | {_ratio(b['ttft_p50_ms'], m['ttft_p50_ms'], 2)} | "
                f"{_ratio(b['ttft_p99_ms'], m['ttft_p99_ms'])} | "
                f"{'∞ (never)' if never_detected else _ratio(b['detect_s'], m['detect_s'])} | "
                f"{_ratio(b['recover_s'], m['recover_s'])} |"
            )
    return out


def error_notes(rows: list[Figures]) -> list[str]:
    out = []
    for r in rows:
        if r["errors"]:
            errs = "; ".join(f"{n} × {e}" for e, n in r["errors"].items())
            out.append(f"- {r['scenario']} / {r['system']}: {errs}")
    return out


OVERHEAD_PATHS = ("direct", "nginx", "bare", "edge", "edge+relay", "edge+relay+limits", "stock envoy", "minimal")
OVERHEAD_MODES = ("non-streaming", "streaming")
PATH_NOTES = {
    "direct": "the client spreads requests over the engines itself",
    "nginx": "the naive design's nginx",
    "bare": "**the bare routing hop**: our Envoy, API keys and relay off",
    "edge": "**the edge as users run it** (API keys on), generation routes straight to the engines",
    "edge+relay": "**the whole gateway**: Envoy (edge + engine hop) and the resuming relay",
    "edge+relay+limits": "the same, a key with request and token limits (the relay's rate-limit check)",
    "stock envoy": "not our config: Envoy's getting-started shape (listener, router, static cluster)",
    "minimal": "our config with every policy part off",
}


# variants that replace a part we keep (rather than take it out): the part
KEPT_PART = {"bare round robin": "least-request balancing", "bare plain routes": "the allow-list and relay routes"}


def _x(v: float | None) -> str:
    return "—" if v is None else f"×{v:.2f}"


def overhead_settings(o: Figures) -> str:
    return (
        f"Concurrency {o['concurrency']}, {o['engines']} zero-delay simulated engines, {o['max_tokens']} tokens "
        f"per answer, {o['seconds']:g} s per path and round after a 1 s warm-up, medians of {o['rounds']} rounds "
        f"(paths in rotating order), {o.get('cpus', '?')} cores. Proxy CPU: the proxy's processes' scheduler "
        "run time (`/proc/<pid>/task/*/schedstat`) per completed request."
    )


def overhead_table(o: Figures) -> list[str]:
    """The paths: references, the gateway as users run it, the bare hop."""
    out = [
        "| mode | path | | req/s | × direct | × nginx | proxy CPU ms/request | × nginx | p50 ms | p99 ms |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for mode in OVERHEAD_MODES:
        for path in OVERHEAD_PATHS:
            m = o[mode].get(path)
            if m is None:
                continue
            if path == "direct":
                cells = f"{m['rps']:.0f} | | | — | | {m['p50_ms']:.1f} | {m['p99_ms']:.0f}"
            else:
                cells = (
                    f"{m['rps']:.0f} | {_x(m['throughput_ratio'])} | {_x(m['rps_vs_nginx'])} | "
                    f"{m['proxy_cpu_ms_per_req']:.3f} | {_x(m['cpu_vs_nginx'])} | {m['p50_ms']:.1f} | {m['p99_ms']:.0f}"
                )
            out.append(f"| {mode} | {path} | {PATH_NOTES[path]} | {cells} |")
    return out


def overhead_variants_table(o: Figures) -> list[str]:
    """What each part of the policy costs: the bare hop with that part changed, Envoy's CPU per
    request, and the paired (same round) difference from the bare hop."""
    out = [
        "| variant | what changes from the bare hop | non-streaming CPU ms/request | vs bare µs | "
        "streaming CPU ms/request | vs bare µs | throughput × direct (non-streaming / streaming) |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for name, what in o.get("variants", {}).items():
        a, b = o["non-streaming"][name], o["streaming"][name]
        if name == "bare":
            d_a = d_b = "—"
        else:
            d_a, d_b = (f"{m['cpu_delta_vs_bare_ms'] * 1000:+.0f}" for m in (a, b))
        out.append(
            f"| {name} | {what} | {a['envoy_cpu_ms_per_req']:.3f} | {d_a} | {b['envoy_cpu_ms_per_req']:.3f} | {d_b} | "
            f"{_x(a['throughput_ratio'])} / {_x(b['throughput_ratio'])} |"
        )
    return out


def overhead_relay_table(o: Figures) -> list[str]:
    r = o.get("relay") or {}
    a, b = o["non-streaming"].get("edge+relay"), o["streaming"].get("edge+relay")
    if not r or a is None or b is None:
        return []
    out = [
        "| the relay path | non-streaming | streaming |",
        "|---|--:|--:|",
        f"| relay CPU ms/request | {a['relay_cpu_ms_per_req']:.3f} | {b['relay_cpu_ms_per_req']:.3f} |",
        f"| Envoy CPU ms/request (the edge and the engine hop) | {a['envoy_cpu_ms_per_req']:.3f} | "
        f"{b['envoy_cpu_ms_per_req']:.3f} |",
        f"| SSE events per request | 1 | {b['events_per_req']:.1f} |",
        f"| relay CPU µs per event (all of it / events) | — | {r['cpu_us_per_event']:.0f} |",
    ]
    if "cpu_us_per_extra_event" in r:
        out.append(
            f"| relay CPU µs per extra event ((streaming − non-streaming) / (events − 1)) | — | "
            f"{r['cpu_us_per_extra_event']:.0f} |"
        )
    if "rate_limit_check_ms" in r:
        out.append(
            f"| the rate-limit check (edge+relay+limits − edge+relay), relay CPU ms/request | "
            f"{r['rate_limit_check_ms']:+.3f} | {r['rate_limit_check_stream_ms']:+.3f} |"
        )
    return out


def overhead_findings(o: Figures) -> list[str]:
    """The goals of issue 17, stated from the figures (so the sentence cannot go stale)."""
    out = []
    for mode in OVERHEAD_MODES:
        m = o[mode]
        bare, nginx = m["bare"], m["nginx"]
        cpu = bare["cpu_vs_nginx"]
        cpu_goal = "met" if cpu <= 1.0 else "within 1.2×" if cpu <= 1.2 else "missed"
        line = (
            f"- {mode}: the bare hop costs {bare['proxy_cpu_ms_per_req']:.3f} ms of CPU per request, "
            f"{_x(bare['cpu_vs_nginx'])} nginx's {nginx['proxy_cpu_ms_per_req']:.3f} "
            f"({cpu_goal}); "
            f"throughput {_x(bare['throughput_ratio'])} direct against nginx's {_x(nginx['throughput_ratio'])} "
            f"({'met' if bare['throughput_ratio'] >= nginx['throughput_ratio'] else 'missed'})."
        )
        if "stock envoy" in m:
            stock = m["stock envoy"]
            vs_stock = bare["proxy_cpu_ms_per_req"] / stock["proxy_cpu_ms_per_req"]
            line += (
                f" Stock Envoy, in the same run: {stock['proxy_cpu_ms_per_req']:.3f} ms ({_x(stock['cpu_vs_nginx'])} "
                f"nginx); the bare hop is {_x(vs_stock)} stock Envoy."
            )
        for path in ("edge", "edge+relay"):
            if path in m:
                line += f" {path}: {m[path]['proxy_cpu_ms_per_req']:.3f} ms ({_x(m[path]['cpu_vs_nginx'])} nginx)."
        # the parts of the policy the gateway keeps: a variant that takes one out
        kept = [v for v in o.get("variants", {}) if v.startswith("bare -") or v in KEPT_PART]
        if kept:
            dearest = min(kept, key=lambda v: m[v]["cpu_delta_vs_bare_ms"])
            part = KEPT_PART.get(dearest, dearest.removeprefix("bare -"))
            line += (
                f" The dearest part we keep, by its paired difference: {part} "
                f"({-m[dearest]['cpu_delta_vs_bare_ms'] * 1000:.0f} µs per request)."
            )
        out.append(line)
    return out


def propagation_lines(p: Figures) -> list[str]:
    return [
        f"{p['changes']} verdict changes over {p['instances']} instances (draining → critical → passing), "
        "each timed from the Consul write to Envoy's admin `/clusters` showing it "
        "(`bench/propagation.py`, by the gateway engineer):",
        "",
        "| p50 ms | p90 ms | p99 ms | max ms | Consul write p50 ms | agent push p50 ms (seen → Envoy ACK) |",
        "|--:|--:|--:|--:|--:|--:|",
        f"| {p['p50_ms']:.1f} | {p['p90_ms']:.1f} | {p['p99_ms']:.1f} | {p['max_ms']:.1f} | "
        f"{p['consul_write_p50_ms']:.1f} | {p['agent_push_p50_ms']:.1f} |",
    ]


def _one_line(text: str) -> str:
    """An error for a table cell: its last non-empty line, no pipes."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[-1] if lines else "?").replace("|", "/")[:200]


def _ms(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def scale_table(sizes: Figures) -> list[str]:
    """One row per size and implementation (old: the baseline's tree, new: this one), same run."""
    out = [
        "| instances | gateway | Consul's answer ms (KiB) | read ms (answer + decode) | snapshot build ms | "
        "EDS encode ms | EDS size KiB | first full snapshot in Envoy s | change → Envoy p50 ms | p99 ms | "
        "agent push ms (seen → ACK) | gateway agent CPU ms/change | Envoy CPU ms/change | Consul CPU ms/change |",
        "|--:|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for n, row in sizes.items():
        for impl in ("old", "new"):
            x = row.get(impl)
            if not x:
                continue
            if x.get("error"):
                why = _one_line(x["error"])
                out.append(f"| {n} | {impl} | {row['consul_answer_ms']:.0f} | failed: {why} |" + " |" * 10)
                continue
            out.append(
                f"| {n} | {impl} | {row['consul_answer_ms']:.0f} ({row['consul_answer_kib']:.0f}) | "
                f"{x['read_ms']:.1f} | {x['build_ms']:.2f} | {x['encode_ms']:.2f} | {x['eds_bytes'] / 1024:.0f} | "
                f"{x['first_snapshot_s']:.2f} | {x['change_p50_ms']:.0f} | {x['change_p99_ms']:.0f} | "
                f"{_ms(x.get('agent_push_mean_ms'))} | {x['agent_cpu_ms_per_change']:.0f} | "
                f"{x['envoy_cpu_ms_per_change']:.0f} | {x['consul_cpu_ms_per_change']:.0f} |"
            )
    return out


def fanout_table(f: Figures) -> list[str]:
    out = [
        f"{f['instances']} instances; per flip, from the Consul write until every watcher delivered it:",
        "",
        "| watchers | gateway code | fan-out p50 ms | p99 ms | Consul CPU ms/change | CPU ms/change per watcher |",
        "|--:|:--|--:|--:|--:|--:|",
    ]
    for impl in ("old", "new"):
        x = f.get(impl)
        if x and x.get("error"):
            out.append(f"| {x['watchers']} | {impl} | failed: {_one_line(x['error'])} | | | |")
        elif x:
            out.append(
                f"| {x['watchers']} | {impl} | {x['fanout_p50_ms']:.0f} | {x['fanout_p99_ms']:.0f} | "
                f"{x['consul_cpu_ms_per_change']:.0f} | {x['watcher_cpu_ms_per_change']:.1f} |"
            )
    return out


def settings_line(rows: list[Figures]) -> str:
    r = rows[0]
    holds = {x.get("hold_s") for x in rows if x.get("hold_s")}
    held = f"fault held {holds.pop():g} s" if len(holds) == 1 else "fault lengths as in the chaos matrix"
    return (
        f"{r['engines']} {'simulated' if r['engine'] == 'sim' else 'vLLM (CPU build)'} engines per system, "
        f"{r['concurrency']} concurrent clients, {r['stream_ratio']:.0%} streaming, "
        f"about {r['duration_s']:.0f} s of load per run, {held}."
    )
