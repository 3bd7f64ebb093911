"""`ernie-mesh top`: the dashboard at a glance in a terminal, for people on SSH.

A live table, redrawn every --interval seconds until Ctrl-C: per instance its verdict (and reason),
running/waiting requests, tokens/s, TTFT p50, errors (5 min), requests/s, CPU and memory; then the
gateways and Consul. The same snapshot as the dashboard page (agent/dashboard/snapshot.py):
figures from Prometheus, verdicts from Consul (else from Prometheus). `--once` prints the table
once; `--json` prints the snapshot as JSON once (for scripts). Exit 1 when neither Prometheus nor
Consul answered, 2 for a bad option.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

from agent.dashboard.config import DEFAULT_PROMETHEUS, DashboardConfig
from agent.dashboard.prom import Prometheus
from agent.dashboard.snapshot import Sources, snapshot

DEFAULT_CONSUL = "127.0.0.1:8500"
COLORS = {"passing": "32", "critical": "1;31", "starting": "33", "draining": "36", "unknown": "33"}
HEADER = ("INSTANCE", "VERDICT", "RUN/WAIT", "TOK/S", "TTFT p50", "ERR 5m", "REQ/S", "CPU", "MEM", "REASON")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh top",
        description="A live table of the mesh in a terminal (Ctrl-C to leave): instance, verdict, running/waiting, "
        "tokens/s, TTFT p50, errors, requests/s, CPU, memory; gateways and Consul. Figures from Prometheus, "
        "verdicts and reasons from Consul.",
    )
    p.add_argument("--prometheus", default=DEFAULT_PROMETHEUS, help=f"Prometheus URL (default {DEFAULT_PROMETHEUS})")
    p.add_argument(
        "--consul",
        default=os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_CONSUL,
        help=f"Consul HTTP address (default $CONSUL_HTTP_ADDR or {DEFAULT_CONSUL})",
    )
    p.add_argument("--no-consul", action="store_true", help="verdicts from Prometheus only (no reason text)")
    p.add_argument("--service", default="ernie", help="engine service name (default ernie)")
    p.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between redraws (default 2)")
    p.add_argument("--once", action="store_true", help="print the table once and exit")
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON once and exit (for scripts)")
    return p


def _num(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.0f}"


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f}ms" if v < 1 else f"{v:.2f}s"


def _bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f}{unit}" if unit == "B" else f"{v:.1f}{unit}"
        v /= 1024
    return "-"


def rows(snap: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for r in snap["instances"]:
        run_wait = f"{_num(r['running'], 0)}/{_num(r['waiting'], 0)}"
        cpu = "-" if r["cpu_cores"] is None else f"{r['cpu_cores']:.2f}"
        reason = str(r["reason"])
        crit = r.get("last_critical")
        if crit and r["verdict"] != "critical":
            reason = f"[critical {crit['ago_s']:.0f}s ago: {crit['reason']}] {reason}"
        out.append(
            (
                str(r["id"]),
                str(r["verdict"]),
                run_wait,
                _num(r["tokens_s"]),
                _secs(r["ttft_p50_s"]),
                _num(r["errors_5m"], 0),
                _num(r["requests_s"], 2),
                cpu,
                _bytes(r["memory_bytes"]),
                reason,
            )
        )
    return out


def render(snap: dict[str, Any], width: int = 160, color: bool = False) -> str:
    prom = snap["prometheus"]
    consul = snap["consul"]
    when = time.strftime("%H:%M:%S", time.localtime(snap["time"]))
    parts = [f"ernie-mesh top  {when}  {snap['passing']}/{len(snap['instances'])} passing"]
    parts.append("Prometheus ok" if prom["up"] else f"Prometheus ERROR ({prom['error'][:80]})")
    if consul is None:
        parts.append("Consul not asked (verdicts from Prometheus)")
    elif consul.get("error"):
        parts.append(f"Consul ERROR ({consul['error'][:80]})")
    else:
        parts.append(f"Consul leader {consul['leader']}")
    lines = ["  ·  ".join(parts), ""]
    table = [HEADER, *rows(snap)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER) - 1)]
    for n, row in enumerate(table):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        if color and n > 0:
            code = COLORS.get(row[1], "0")
            cells[1] = f"\x1b[{code}m{cells[1]}\x1b[0m"
        line = "  ".join(cells) + "  " + row[-1]
        lines.append(line[: width + (len(line) - len(_plain(line)))] if width else line)  # cut at the edge
    if not snap["instances"]:
        lines.append("(no instance registered)")
    lines.append("")
    if snap["gateways"]:
        for g in snap["gateways"]:
            envoy = {None: "-", 1.0: "up"}.get(g["envoy_up"], "DOWN")
            watch = {None: "-", 1.0: "ok"}.get(g["consul_up"], "FAILING")
            lines.append(
                f"gateway {g['id']}: {g['status'] or '-'}  envoy {envoy}  catalog watch {watch}  "
                f"healthy endpoints {_num(g['endpoints_healthy'], 0)}  req/s {_num(g['requests_s'], 2)}  "
                f"5xx/s {_num(g['errors_s'], 2)}  resumes 5m {_num(g['resumes_5m'], 0)}  "
                f"ejections 5m {_num(g['ejections_5m'], 0)}"
            )
    else:
        lines.append("gateways: none seen")
    return "\n".join(lines)


def _plain(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def answered(snap: dict[str, Any]) -> bool:
    consul_ok = snap["consul"] is not None and not snap["consul"].get("error")
    return bool(snap["prometheus"]["up"] or consul_ok)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.interval < 0.5:
        print("ernie-mesh top: --interval must be >= 0.5", file=sys.stderr)
        return 2
    cfg = DashboardConfig(prometheus=args.prometheus, consul=None if args.no_consul else args.consul)
    src = Sources(Prometheus(cfg.prometheus), cfg.consul, args.service)
    if args.json:
        snap = snapshot(src)
        print(json.dumps(snap, indent=2))
        return 0 if answered(snap) else 1
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if args.once:
        snap = snapshot(src)
        print(render(snap, shutil.get_terminal_size().columns if sys.stdout.isatty() else 0, color))
        return 0 if answered(snap) else 1
    if cfg.consul:  # a crash flaps critical for ~1 s: the watch sees it, a redraw every 2 s might not
        from agent.dashboard.incidents import VerdictWatch

        src = Sources(src.prometheus, src.consul, src.service, VerdictWatch(cfg.consul, args.service).start())
    tty = sys.stdout.isatty()
    try:
        if tty:
            sys.stdout.write("\x1b[?25l")  # hide the cursor while we redraw
        while True:
            started = time.monotonic()
            snap = snapshot(src)
            frame = render(snap, shutil.get_terminal_size().columns, color)
            hint = f"\n\nrefresh every {args.interval:g}s · Ctrl-C to leave"
            sys.stdout.write(("\x1b[H\x1b[2J" if tty else "\n") + frame + hint + "\n")
            sys.stdout.flush()
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
    finally:
        if tty:
            sys.stdout.write("\x1b[?25h\n")
            sys.stdout.flush()
