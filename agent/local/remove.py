"""`ernie-mesh remove <instance-id>...`: drain engines of the running local mesh and stop them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.durations import positive_seconds
from agent.config import ConfigError
from agent.local.engines import RunningMesh, remove_engine
from agent.local.mesh import Console
from agent.local.plan import default_run_dir

DESCRIPTION = """\
Drain an engine of the mesh a running `ernie-mesh up` serves, then stop it: its engine agent turns
the instance `draining` in Consul (the gateways send it nothing new), waits until every request in
flight has finished, stops the engine and deregisters it. Nothing in flight is cut. Any engine of
the local mesh can go, the ones `up` started as well as the ones `ernie-mesh add` added. Removing
the last passing engine of a model is refused (its requests would fail) unless --force.
Exit codes: 0 removed, 1 an engine did not stop in time (killed), 2 bad input (no running mesh, an
unknown instance), 130 Ctrl-C (the drain goes on by itself).
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh remove", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("instance_ids", nargs="+", metavar="instance-id", help="as `ernie-mesh status` lists them")
    p.add_argument("--force", action="store_true", help="remove even the last passing engine of a model")
    p.add_argument("--run-dir", default=None, help=f"the run directory of `up` (default {default_run_dir()})")
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=None,
        metavar="S",
        help="kill an engine not drained and stopped after S seconds (default: the drain deadline + 60)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout at the end; progress on stderr")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    out = Console(args.json)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else default_run_dir()
    try:
        mesh = RunningMesh(run_dir)
        targets = [mesh.find(iid) for iid in dict.fromkeys(args.instance_ids)]
        if not args.force:
            going = {t.instance_id for t in targets}
            for model in {t.model for t in targets}:
                if not [e for e in mesh.passing(model) if e.instance_id not in going]:
                    raise ConfigError(
                        f"that would leave no passing engine for model {model!r} (its requests would fail): "
                        "add one first (`ernie-mesh add`), or --force"
                    )
    except ConfigError as e:
        print(f"ernie-mesh remove: {e}", file=sys.stderr)
        out.event(event="error", message=str(e))
        return 2
    removed: dict[str, float] = {}
    code = 0
    try:
        for engine in targets:
            out.step(f"removing {engine.instance_id} ({engine.name}, pid {engine.proc.pid})")
            seconds, killed = remove_engine(mesh, engine, out.info, args.timeout)
            removed[engine.instance_id] = round(seconds, 1)
            if killed:
                code = 1
                out.warn(f"{engine.instance_id} had to be killed after {seconds:.1f}s")
            else:
                out.step(f"{engine.instance_id} drained and stopped in {seconds:.1f}s")
    except KeyboardInterrupt:
        out.warn("interrupted: an engine agent that got the signal keeps draining and stops by itself")
        out.event(event="interrupted", removed=removed)
        return 130
    out.event(event="removed", removed=removed)
    return code
