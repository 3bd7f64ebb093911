"""`ernie-mesh down`: stop the mesh a running `ernie-mesh up` started (from another terminal, `make down`).

It signals `up` (SIGTERM: the same orderly stop as Ctrl-C), follows its progress through the
state file and waits until `up` and every process of the mesh are gone. If `up` itself is gone
(killed), `down` stops the processes it recorded, in the same order, and kills what remains.
Engines added by `ernie-mesh add` (their records in <run-dir>/added/) are stopped with `up`'s own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agent.local.parts import mesh_parts, stop_order
from agent.local.plan import default_run_dir
from agent.local.runstate import AddedEngine, Proc, drop_added, kill, read_added, read_state, wait_gone, write_state

DEFAULT_TIMEOUT_S = 600.0
# Every part a mesh can have, in `up`'s stop order with its timeouts (a replicated part owns its
# processes by name, whatever their number).
STOP_ORDER = stop_order(mesh_parts())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh down", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run-dir", default=None, help=f"the run directory `up` used (default {default_run_dir()})")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"kill whatever is left after S seconds (default {DEFAULT_TIMEOUT_S:.0f}; engines drain first)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    return p


def stop_orphans(procs: list[Proc], say: Callable[[str], None]) -> None:
    """`up` is gone: SIGTERM the recorded parts in order (each drains as with `up`), then sweep.

    Only the parts' own processes are signalled here; their children (`engine-agent-1/<command>`)
    and anything else recorded are left to the caller's final sweep."""
    for part in STOP_ORDER:
        group = [p for p in procs if part.owns(p.name) and p.alive()]
        if not group:
            continue
        say(f"stopping {', '.join(p.name for p in group)}")
        for p in group:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in wait_gone(group, part.stop_timeout_s):
            say(f"{p.name} did not stop in time: killing it")
            kill(p)


def with_added(procs: list[Proc], added: list[AddedEngine]) -> list[Proc]:
    """`up`'s recorded processes and the engine agents `ernie-mesh add` started (up adopts them
    into its state file within seconds, but not before `down` may need them)."""
    pids = {p.pid for p in procs}
    return procs + [r.proc() for r in added if r.pid not in pids]


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    run_dir = os.path.abspath(args.run_dir) if args.run_dir else str(default_run_dir())
    state_path = os.path.join(run_dir, "up.json")
    say: Callable[[str], None] = (
        (lambda m: print(f"down: {m}", file=sys.stderr, flush=True))
        if args.json
        else (lambda m: print(f"==> {m}", flush=True))
    )
    state = read_state(Path(state_path))
    if state is None or (state.phase == "stopped" and not state.owner().alive()):
        say(f"no mesh running (state file {state_path}: {'absent' if state is None else 'stopped'})")
        if args.json:
            print(json.dumps({"stopped": False, "reason": "not running"}))
        return 0
    started = time.monotonic()
    owner = state.owner()
    added = [r for r in read_added(run_dir) if r.alive()]
    procs = with_added(state.procs(), added)
    if owner.alive():
        say(f"stopping the mesh of `ernie-mesh up` (pid {owner.pid})")
        os.kill(owner.pid, signal.SIGTERM)
        deadline = started + args.timeout
        last_step = None
        while owner.alive() and time.monotonic() < deadline:
            now = read_state(Path(state_path))
            if now is not None:
                procs = with_added(now.procs(), added) if now.procs() else procs
                if now.step and now.step != last_step:
                    last_step = now.step
                    say(f"  {now.step}")
            time.sleep(0.2)
        if owner.alive():
            say(f"`up` (pid {owner.pid}) did not finish within {args.timeout:.0f}s: killing it and what is left")
            kill(owner)
    elif state.phase != "stopped":
        say(f"`ernie-mesh up` (pid {owner.pid}) is gone; stopping what it left running")
        stop_orphans(procs, say)
    left = [p for p in procs if p.alive()]
    for p in left:
        say(f"left behind, killing: {p.name} (pid {p.pid})")
        kill(p)
    survivors = wait_gone(left, 5.0)
    for r in added:
        if not r.alive():
            drop_added(run_dir, r.name)
    if state.phase != "stopped" and not owner.alive():
        final = read_state(Path(state_path)) or state
        if final.phase != "stopped":
            final.phase, final.step = "stopped", ""
            write_state(Path(state_path), final)
    seconds = time.monotonic() - started
    if survivors:
        say(f"{len(survivors)} process(es) survived: " + ", ".join(f"{p.name} ({p.pid})" for p in survivors))
    else:
        say(f"mesh stopped in {seconds:.1f}s; no process left behind")
    if args.json:
        print(
            json.dumps(
                {
                    "stopped": True,
                    "seconds": round(seconds, 1),
                    "killed": [p.name for p in left],
                    "survivors": [p.name for p in survivors],
                }
            )
        )
    return 1 if survivors else 0
