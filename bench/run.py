"""`python -m bench`: run the drills and benchmarks, keep the figures in bench/results/latest.json
and rewrite docs/reliability.md (the drills, the chaos matrix) and docs/benchmarks.md (overhead,
propagation, scale) from them.

    python -m bench                       # drills (simulated engines, both systems), overhead,
                                          # propagation, scale
    python -m bench --only vllm           # the kill, hang and rolling drills with real vLLM engines
    python -m bench --only drills --duration 30  # every drill with simulated engines
    python -m bench --drills consul-leader-loss,gateway-host-loss  # these drills only; the other
                                          # rows of the chaos matrix keep their figures

Parts not run keep their last figures (each part records its own date), so a long vLLM run and
the simulated-engine runs can be done separately and still land in one document.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import report
from bench.drill import DrillOptions, run_drill, stop_on_sigterm
from bench.report import Figures
from bench.scenarios import NETNS, SCENARIOS

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
PARTS = ("drills", "overhead", "propagation", "scale", "routing", "vllm")
DEFAULT_PARTS = ("drills", "overhead", "propagation", "scale", "routing")
VLLM_SCENARIOS = ("kill", "hang", "rolling")


def progress(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} bench: {msg}", file=sys.stderr, flush=True)


def load_results() -> Figures:
    try:
        results: Figures = json.loads(RESULTS.read_text())
        return results
    except (OSError, ValueError):
        return {}


def save_results(results: Figures) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def stamp(part: Figures) -> Figures:
    return {"machine": report.machine(), **part}


def run_drills(args: argparse.Namespace, engine: str, names: tuple[str, ...] | None = None) -> Figures:
    rows = []
    stop = threading.Event()
    if names is None:
        names = VLLM_SCENARIOS if engine == "vllm" else tuple(SCENARIOS)
    netns_why = ""
    if engine != "vllm" and set(names) & NETNS:
        from bench.netns import available

        netns_why = available()
    for name in names:
        if name in NETNS and netns_why:
            progress(f"{name}: not run ({netns_why}); its rows keep their last figures")
            continue
        if engine == "vllm":
            opts = DrillOptions(
                name,
                "both",
                args.vllm_engines,
                "vllm",
                args.vllm_duration,
                args.vllm_concurrency,
                0.5,
                args.max_tokens,
                request_timeout_s=300.0,
            )
        else:
            opts = DrillOptions(name, "both", 3, "sim", args.duration, args.concurrency, 0.5, args.max_tokens)
        for r in run_drill(opts, stop):
            progress(
                f"{name} {r['system']}: requests {r['requests']} failed {r['failed']} truncated "
                f"{r['truncated']} detect {r['detect_s']} recover {r['recover_s']}"
            )
            rows.append(r)
    return {"rows": rows}


def merge_rows(part: Figures | None, new_rows: list[Figures]) -> Figures:
    """The drills part with `new_rows` in place of the rows of the same scenarios (or added); each
    new row keeps the machine it ran on (the part's own line stays that of the last full run)."""
    part = dict(part) if part else stamp({"rows": []})
    machine = report.machine()
    replaced = {r["scenario"] for r in new_rows}
    kept = [r for r in part.get("rows", []) if r["scenario"] not in replaced]
    part["rows"] = kept + [{**r, "machine": machine} for r in new_rows]
    return part


def run_propagation(workdir: Path) -> Figures:
    try:
        from bench import propagation
    except ImportError:
        pass
    else:
        if hasattr(propagation, "run"):
            return propagation.run(60, 3, workdir)
    out = subprocess.run(
        [sys.executable, "-m", "bench.propagation", "--json"], capture_output=True, text=True, timeout=1800
    )
    figures: Figures = json.loads(out.stdout)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", help=f"comma-separated parts among {','.join(PARTS)} (default: {','.join(DEFAULT_PARTS)})")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per drill (default 60)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--vllm-engines", type=int, default=2, help="vLLM engines per system (default 2: 2 cores)")
    p.add_argument("--vllm-concurrency", type=int, default=4)
    p.add_argument("--vllm-duration", type=float, default=120.0)
    p.add_argument(
        "--drills",
        help="comma-separated drills (simulated engines) to run alone: their rows replace those of the "
        "last run, each row stamped with its own machine line; no other part runs unless --only says so",
    )
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md and docs/reliability.md")
    args = p.parse_args(argv)
    parts = tuple(x.strip() for x in args.only.split(",")) if args.only else DEFAULT_PARTS
    drills = tuple(x.strip() for x in args.drills.split(",")) if args.drills else ()
    if drills and not args.only:
        parts = ()
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    if set(drills) - set(SCENARIOS):
        p.error(f"unknown drill(s): {', '.join(sorted(set(drills) - set(SCENARIOS)))}")
    if drills and "drills" in parts:
        p.error("--drills runs some drills, --only drills all of them: choose one")
    stop_on_sigterm()
    results = load_results()
    workdir = Path(tempfile.mkdtemp(prefix="ernie-bench-"))
    try:
        for part in parts:
            progress(f"--- {part} ---")
            if part == "drills":
                fresh = stamp(run_drills(args, "sim"))
                ran = {r["scenario"] for r in fresh["rows"]}
                # drills not run here (the netns ones without root) keep their rows, with their machine
                kept = [
                    {"machine": (results.get("drills") or {}).get("machine"), **r}
                    for r in (results.get("drills") or {}).get("rows", [])
                    if r["scenario"] in NETNS and r["scenario"] not in ran
                ]
                fresh["rows"] += kept
                results["drills"] = fresh
            elif part == "vllm":
                results["vllm"] = stamp(run_drills(args, "vllm"))
            elif part == "overhead":
                from bench import overhead

                results["overhead"] = stamp(overhead.run(workdir=workdir / "overhead"))
            elif part == "propagation":
                results["propagation"] = stamp(run_propagation(workdir / "propagation"))
            elif part == "routing":
                from bench import routing

                results["routing"] = stamp(routing.run(workdir=workdir / "routing"))
            elif part == "scale":
                from bench import scale

                results["scale"] = stamp(scale.run(workdir=workdir / "scale"))
            save_results(results)
        if drills:
            progress(f"--- drills {', '.join(drills)} ---")
            results["drills"] = merge_rows(results.get("drills"), run_drills(args, "sim", drills)["rows"])
            save_results(results)
    except KeyboardInterrupt:
        progress("interrupted: figures of the parts that finished are kept")
        save_results(results)
        return 130
    if not args.no_doc:
        from bench.document import write

        write(results)
        progress(f"wrote {report.RELIABILITY_DOC} and {report.DOC}")
    return 0
