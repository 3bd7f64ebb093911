"""`ernie-mesh scale N`: add or remove engines of the running local mesh until N of a model pass."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from agent.durations import positive_seconds
from agent.config import ConfigError
from agent.local.binaries import MissingBinary
from agent.local.engines import (
    DEFAULT_PASSING_TIMEOUT_S,
    AddRequest,
    EngineFailed,
    Interrupted,
    RunningMesh,
    Started,
    abandon,
    removal_order,
    remove_engine,
    start_engine,
    stop_on_signals,
    wait_passing,
    wait_routed,
)
from agent.local.mesh import Console
from agent.local.plan import ENGINE_KINDS, MAX_ENGINES, default_run_dir

DESCRIPTION = """\
Make N engines of a model pass in the mesh a running `ernie-mesh up` serves: with fewer, start the
missing ones at once as `ernie-mesh add` does and wait until they all pass; with more, remove the
surplus one by one as `ernie-mesh remove` does (drained: nothing in flight is cut), the engines
added last first, then `up`'s own from the last. Exit codes: 0 done, 1 an engine did not come up
(the ones this run started are stopped again) or had to be killed, 2 bad input, 130 Ctrl-C.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh scale", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("engines", type=int, metavar="N", help=f"engines of the model that should pass (1-{MAX_ENGINES})")
    p.add_argument("--model", default="", help="which model's engines (the name clients send; default the mesh's)")
    p.add_argument("--engine-kind", choices=ENGINE_KINDS, default="", help="for engines added (default: the mesh's)")
    p.add_argument("--vllm-args", default=None, metavar="'ARGS'", help="for engines added (default: the mesh's)")
    p.add_argument("--run-dir", default=None, help=f"the run directory of `up` (default {default_run_dir()})")
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_PASSING_TIMEOUT_S,
        metavar="S",
        help=f"give up on engines not passing after S seconds (default {DEFAULT_PASSING_TIMEOUT_S:.0f})",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout at the end; progress on stderr")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    out = Console(args.json)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else default_run_dir()

    def bad(message: str) -> int:
        print(f"ernie-mesh scale: {message}", file=sys.stderr)
        out.event(event="error", message=message)
        return 2

    if not (1 <= args.engines <= MAX_ENGINES):
        return bad(f"N must be 1-{MAX_ENGINES}, got {args.engines} (to stop the whole mesh: `ernie-mesh down`)")
    try:
        mesh = RunningMesh(run_dir)
    except ConfigError as e:
        return bad(str(e))
    model = args.model or mesh.plan.model_name
    mine = [e for e in mesh.engines() if e.model == model]
    if not mine and not args.model:
        return bad(f"the mesh has no engine of model {model!r}: name the model with --model")
    added: dict[str, float] = {}
    removed: dict[str, float] = {}
    code = 0
    out.step(f"scaling model {model!r} from {len(mine)} to {args.engines} engine(s)")
    if args.engines > len(mine):
        req = AddRequest(
            engine_kind=args.engine_kind,
            model=args.model,
            vllm_args=tuple(shlex.split(args.vllm_args)) if args.vllm_args is not None else None,
        )
        started: list[Started] = []
        try:
            for _ in range(args.engines - len(mine)):
                started.append(start_engine(mesh, req, out.info))
        except (ConfigError, MissingBinary) as e:
            abandon(mesh, started, out.info)
            return bad(str(e))
        stop = stop_on_signals(out.warn)
        ids = [s.record.instance_id for s in started]
        out.step(f"waiting for {len(started)} engine(s) to pass their health checks; no traffic before")
        try:
            added = {k: round(v, 1) for k, v in wait_passing(mesh, started, args.timeout, out.info, stop).items()}
            if not wait_routed(mesh.plan, ids, stop):
                out.warn("the gateway does not route to every added engine yet")
        except Interrupted:
            abandon(mesh, started, out.info)
            out.event(event="failed", message="interrupted")
            return 130
        except EngineFailed as e:
            out.warn(f"an engine did not come up: {e}; stopping the ones this run started")
            abandon(mesh, started, out.info)
            out.event(event="failed", message=str(e))
            return 1
    elif args.engines < len(mine):
        for engine in removal_order(mine)[: len(mine) - args.engines]:
            out.step(f"removing {engine.instance_id} ({engine.name})")
            seconds, killed = remove_engine(mesh, engine, out.info)
            removed[engine.instance_id] = round(seconds, 1)
            code = 1 if killed else code
    passing = len(mesh.passing(model))
    out.step(f"model {model!r}: {passing} engine(s) passing after {out.elapsed():.1f}s")
    out.event(
        event="scaled",
        model=model,
        engines=args.engines,
        passing=passing,
        added=added,
        removed=removed,
        seconds=round(out.elapsed(), 1),
    )
    return code
