"""`ernie-mesh add`: one more engine agent + engine joining the running local mesh (`ernie-mesh up`)."""

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
    abandon,
    run_dir_flag,
    start_engine,
    stop_on_signals,
    wait_passing,
    wait_routed,
)
from agent.local.mesh import Console
from agent.local.plan import ENGINE_KINDS, default_run_dir

DESCRIPTION = """\
Start one more engine agent + engine and join it to the mesh a running `ernie-mesh up` (`make up`)
serves. By default it is like the mesh's engines (same engine kind, model and --vllm-args), on the
next free ports (engine 8001+N.., agent 9201+N.., shifted by the mesh's --port-offset); with a GPU
it takes a GPU no running engine holds (none free: refused), on CPU the cores the running engines
use least.

It registers in Consul as `starting` and takes traffic only once it passes: vLLM loaded the model
and a first canary generation succeeded. `add` reports its progress and returns when the gateway
routes to it. `up` stops it with its own engines (Ctrl-C, `ernie-mesh down`); `ernie-mesh remove
<instance-id>` drains and stops it before. Exit codes: 0 passing, 1 it did not come up (stopped
again; its log is named), 2 bad input (no running mesh, port in use, no free GPU), 130 Ctrl-C.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh add", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default="",
        help="model to serve (vLLM: hub name, directory, or a built-in: smollm2, tiny-ernie (random weights); "
        "simulated: the model name it answers to); "
        "default: the mesh's. A second model makes the mesh serve two",
    )
    p.add_argument("--served-model-name", default="", help="model name clients use (default: derived from --model)")
    p.add_argument("--port", type=int, default=None, help="the engine's port (default: the next free slot's)")
    p.add_argument(
        "--vllm-args",
        default=None,
        metavar="'ARGS'",
        help="extra vLLM arguments for this engine, instead of the mesh's --vllm-args",
    )
    p.add_argument("--engine-kind", choices=ENGINE_KINDS, default="", help="vllm or simulated (default: the mesh's)")
    p.add_argument("--run-dir", default=None, help=f"the run directory of `up` (default {default_run_dir()})")
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_PASSING_TIMEOUT_S,
        metavar="S",
        help=f"give up (stop it again) if not passing after S s (default {DEFAULT_PASSING_TIMEOUT_S:.0f})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object on stdout at the end ('added' or 'failed'); progress on stderr",
    )
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    out = Console(args.json)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else default_run_dir()
    req = AddRequest(
        engine_kind=args.engine_kind,
        model=args.model,
        served_model_name=args.served_model_name,
        port=args.port,
        vllm_args=tuple(shlex.split(args.vllm_args)) if args.vllm_args is not None else None,
    )
    try:
        mesh = RunningMesh(run_dir)
        out.step(f"adding an engine to the mesh of `ernie-mesh up` (pid {mesh.state.pid}, {run_dir})")
        started = start_engine(mesh, req, out.info)
    except (ConfigError, MissingBinary) as e:
        print(f"ernie-mesh add: {e}", file=sys.stderr)
        out.event(event="error", message=str(e))
        return 2
    stop = stop_on_signals(out.warn)
    rec = started.record
    what = "vLLM loads the model, then a first canary generation" if rec.engine_kind == "vllm" else "simulated engine"
    out.step(f"waiting for {rec.instance_id} to pass its health check ({what}); no traffic before")
    try:
        seconds = wait_passing(mesh, [started], args.timeout, out.info, stop)[rec.instance_id]
        routed = wait_routed(mesh.plan, [rec.instance_id], stop)
    except Interrupted:
        abandon(mesh, [started], out.info)
        out.event(event="failed", message="interrupted")
        return 130
    except EngineFailed as e:
        out.warn(f"the engine did not come up: {e}")
        abandon(mesh, [started], out.info)
        out.event(event="failed", message=str(e))
        return 1
    routed_after = out.elapsed()
    out.step(
        f"{rec.instance_id} is passing after {seconds:.1f}s"
        + ("; the gateway routes to it" if routed else "; the gateway does not list it yet (see its log)")
    )
    out.info(f"remove it: ernie-mesh remove {rec.instance_id}{run_dir_flag(mesh)}")
    out.event(
        event="added",
        instance=rec.instance_id,
        name=rec.name,
        engine_kind=rec.engine_kind,
        model=rec.model,
        engine_port=rec.engine_port,
        agent_port=rec.agent_port,
        placement=rec.placement,
        seconds=round(seconds, 1),
        routed=routed,
        routed_after_s=round(routed_after, 1),
        pid=rec.pid,
    )
    return 0
