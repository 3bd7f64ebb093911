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


def overhead_table(o: Figures) -> list[str]:
    out = [
        f"Concurrency {o['concurrency']}, {o['engines']} zero-delay simulated engines, {o['max_tokens']} tokens "
        f"per answer, {o['seconds']:g} s per path and round, medians of {o['rounds']} rounds "
        "(paths in rotating order).",
        "",
        "| mode | path | req/s | p50 ms | p99 ms | proxy CPU ms/request | added p50 ms | added p99 ms | "
        "throughput vs direct |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    paths = [p for p in ("direct", "envoy", "envoy+relay", "nginx") if p in o["streaming"]]
    for mode in ("non-streaming", "streaming"):
        for path in paths:
            m = o[mode][path]
            extra = (
                "| | |"
                if path == "direct"
                else (f"| {m['added_p50_ms']:+.2f} | {m['added_p99_ms']:+.2f} | ×{m['throughput_ratio']:.2f} |")
            )
            cpu = "—" if path == "direct" else f"{m.get('proxy_cpu_ms_per_req', 0):.3f}"
            out.append(f"| {mode} | {path} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {cpu} {extra}")
    if "envoy+relay" in o["streaming"]:
        out += [
            "",
            "The resuming relay's own cost (its processes' CPU, measured in a separate run of the same "
            "load; an event is one SSE `data:` line):",
            "",
            "| mode | envoy+relay vs envoy alone (throughput) | relay CPU ms/request | relay CPU µs/event |",
            "|---|--:|--:|--:|",
        ]
        for mode in ("non-streaming", "streaming"):
            m = o[mode]["envoy+relay"]
            per_event = f"{m['relay_cpu_us_per_event']:.1f}" if mode == "streaming" else "—"
            out.append(f"| {mode} | ×{m['vs_envoy_ratio']:.2f} | {m['relay_cpu_ms_per_req']:.3f} | {per_event} |")
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


def scale_table(s: Figures) -> list[str]:
    out = [
        "| instances | snapshot build ms | EDS encode ms | EDS size KiB | Consul read ms | "
        "first full snapshot in Envoy s | change → Envoy p50 ms | p99 ms | agent push ms (seen → ACK) | "
        "gateway agent CPU ms/change | Envoy CPU ms/change |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for n, x in s.items():
        read = x.get("consul_read_ms")
        push = x.get("agent_push_mean_ms")
        out.append(
            f"| {n} | {x['build_ms']:.1f} | {x['encode_ms']:.1f} | {x['eds_bytes'] / 1024:.0f} | "
            f"{'—' if read is None else f'{read:.0f}'} | "
            f"{x['first_snapshot_s']:.2f} | {x['change_p50_ms']:.0f} | {x['change_p99_ms']:.0f} | "
            f"{'—' if push is None else f'{push:.0f}'} | "
            f"{x['agent_cpu_ms_per_change']:.0f} | {x['envoy_cpu_ms_per_change']:.0f} |"
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
