"""The engines of a running local mesh (`ernie-mesh up`) and the three day-two operations on them:
start one more (`ernie-mesh add`), drain and stop one (`ernie-mesh remove`), and both until a
number of engines pass (`ernie-mesh scale`).

An added engine is an engine agent like `up`'s own, configured the same way (agent/local/plan.py),
placed on a free GPU or the least used cores (agent/local/placement.py), started in its own session
so it outlives `add`, and recorded in `<run_dir>/added/` (agent/local/runstate.py): `up` stops it
with its own engines, `down` too if `up` is gone. It takes traffic only once it passes: its agent
reports `starting` until the engine answers and a first canary generation succeeded; gateways
route passing instances only. Removing an engine is its agent's SIGTERM: the agent turns the
instance `draining` (gateways send it nothing new), waits until nothing is in flight, stops the
engine and deregisters it (docs/architecture.md §2.3) — nothing in flight is cut.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.builtin_models import BUILTIN_MODELS, builtin
from agent.builtin_models import DEFAULT as DEFAULT_BUILTIN
from agent.catalog.base import CatalogEntry, CatalogError, VerdictCause
from agent.catalog.consul import ConsulCatalog
from agent.config import ConfigError
from agent.local.binaries import MissingBinary
from agent.local.parts import ENGINE_AGENT_STOP_MARGIN_S
from agent.local.placement import Placement, gpu_indices, place
from agent.local.plan import GATEWAY_METRICS_PORT, MAX_ENGINES, SIMULATED_MODEL_NAME, MeshPlan
from agent.local.procs import ManagedProcess, child_env, mesh_command
from agent.local.runstate import (
    AddedEngine,
    Proc,
    UpState,
    claim_added,
    descendants,
    drop_added,
    kill,
    proc_identity,
    read_added,
    read_state,
    wait_gone,
    write_added,
)
from agent.net import can_bind

POLL_S = 0.25
HEARTBEAT_S = 15.0
DEFAULT_PASSING_TIMEOUT_S = 900.0
ROUTE_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 2.0
WEIGHT_METRIC = "ernie_gateway_instance_weight"


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) while waiting."""


class EngineFailed(Exception):
    """An added engine did not come up (the message says why and where its log is)."""


@dataclass(frozen=True)
class LocalEngine:
    """One running engine of the local mesh: its engine agent and what it serves."""

    name: str  # engine-agent-<slot + 1>
    slot: int
    instance_id: str
    proc: Proc  # the engine agent
    config: Path
    added: AddedEngine | None  # None: one of the engines `up` started

    def engine_table(self) -> dict[str, Any]:
        """Its [[engines]] table as written in its engine.toml ({} if unreadable)."""
        try:
            with open(self.config, "rb") as f:
                engines = tomllib.load(f).get("engines", [])
        except (OSError, tomllib.TOMLDecodeError):
            return {}
        return dict(engines[0]) if engines else {}

    @property
    def model(self) -> str:
        return str(self.engine_table().get("served_model_name", ""))


def _no_mesh(run_dir: Path, why: str) -> ConfigError:
    return ConfigError(f"no running mesh in {run_dir} ({why}): start one with `ernie-mesh up` or `make up`")


class RunningMesh:
    """The mesh a live `ernie-mesh up` runs from `run_dir` (ConfigError when there is none)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        state = read_state(run_dir / "up.json")
        if state is None:
            raise _no_mesh(run_dir, "no state file")
        if not state.owner().alive():
            raise _no_mesh(run_dir, f"`up` pid {state.pid} is gone")
        if state.phase != "healthy":
            raise ConfigError(
                f"the mesh in {run_dir} is {state.phase}, not healthy: wait until `ernie-mesh up` reports "
                "healthy, then try again"
            )
        spec = state.plan.get("spec")
        if not isinstance(spec, dict):
            raise ConfigError(
                f"the mesh in {run_dir} was started by an older `ernie-mesh up`: restart it to add engines"
            )
        self.state: UpState = state
        self.plan = MeshPlan.from_spec(spec)
        self.catalog = ConsulCatalog(self.plan.consul_address)

    def engines(self) -> list[LocalEngine]:
        """Every engine whose agent runs: `up`'s own, then the added ones, by slot."""
        out = []
        recorded = {p.name: p for p in self.state.procs()}
        for i in range(self.plan.engines):
            name = f"engine-agent-{i + 1}"
            proc = recorded.get(name)
            if proc is not None and proc.alive():
                config = self.run_dir / f"engine-{i + 1}.toml"
                out.append(LocalEngine(name, i, self.plan.instance_id(i), proc, config, None))
        for rec in read_added(self.run_dir):
            if rec.alive():
                out.append(LocalEngine(rec.name, rec.slot, rec.instance_id, rec.proc(), Path(rec.config), rec))
        return out

    def find(self, instance_id: str) -> LocalEngine:
        for e in self.engines():
            if e.instance_id == instance_id:
                return e
        known = self.entries()
        if instance_id in known:
            raise ConfigError(
                f"{instance_id} is not an engine of the local mesh in {self.run_dir} (another host's?): "
                "drain it with `ernie-mesh drain`"
            )
        ids = ", ".join(e.instance_id for e in self.engines()) or "none"
        raise ConfigError(f"no engine {instance_id!r} in the local mesh (its engines: {ids}; `ernie-mesh status`)")

    def entries(self) -> dict[str, CatalogEntry]:
        try:
            _idx, entries = self.catalog.instances(self.plan.service)
        except CatalogError:
            return {}
        return {e.instance_id: e for e in entries}

    def passing(self, model: str | None = None) -> list[LocalEngine]:
        now = self.entries()
        return [
            e
            for e in self.engines()
            if (model is None or e.model == model)
            and e.instance_id in now
            and now[e.instance_id].verdict.state.value == "passing"
        ]


# --- add ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddRequest:
    engine_kind: str = ""  # "" = the mesh's
    model: str = ""  # "" = the mesh's model (vLLM: hub name or directory; simulated: the name it serves)
    served_model_name: str = ""  # "" = derived from the model
    port: int | None = None  # None = the next slot's engine port
    vllm_args: tuple[str, ...] | None = None  # None = the mesh's --vllm-args


@dataclass
class Started:
    """An added engine whose agent was just started (not passing yet)."""

    record: AddedEngine
    process: ManagedProcess
    log: Path


def _model(mesh: RunningMesh, req: AddRequest, kind: str) -> tuple[str, str]:
    """(model path for vLLM, served model name) of the engine to add."""
    plan = mesh.plan
    if kind == "simulated":
        return "", req.served_model_name or req.model or SIMULATED_MODEL_NAME
    if req.model:
        chosen = builtin(req.model)
        if chosen is None:  # a hub name or a directory: vLLM loads it
            return req.model, req.served_model_name or req.model
        name = chosen.name
    elif plan.engine_kind == "vllm":
        chosen = plan.builtin_model
        if chosen is None:
            return plan.model, req.served_model_name or plan.model_name
        name = plan.model_name
    else:
        chosen, name = BUILTIN_MODELS[DEFAULT_BUILTIN], DEFAULT_BUILTIN
    from agent.model import is_prepared

    dest = chosen.model_dir()
    path = dest if is_prepared(dest) else chosen.prepare(dest, print)
    return str(path), req.served_model_name or name


def placement_for(mesh: RunningMesh, kind: str) -> Placement:
    """A free GPU, or the least used cores, given what the running vLLM engines hold."""
    if kind != "vllm":
        return Placement()
    running = [t.get("env", {}) for t in (e.engine_table() for e in mesh.engines()) if t.get("kind") == "vllm"]
    return place(running, gpu_indices())


def start_engine(mesh: RunningMesh, req: AddRequest, say: Callable[[str], None]) -> Started:
    """Claim a slot, write the engine agent's config and start it; ConfigError/MissingBinary for bad input."""
    plan = mesh.plan
    kind = req.engine_kind or plan.engine_kind
    if kind == "vllm" and importlib.util.find_spec("vllm") is None:
        raise MissingBinary("vLLM is not installed here: `scripts/install.sh core`, or add a --engine-kind simulated")
    engines = mesh.engines()
    if req.port is not None:
        if not (1 <= req.port <= 65535):
            raise ConfigError(f"--port must be 1-65535, got {req.port}")
        taken = {int(e.engine_table().get("port", 0)) for e in engines}
        if req.port in taken or not can_bind("127.0.0.1", req.port):
            raise ConfigError(
                f"port {req.port} is already in use on 127.0.0.1: choose another --port (or leave it out)"
            )
    model_path, model_name = _model(mesh, req, kind)
    placement = placement_for(mesh, kind)
    used_slots = {e.slot for e in engines}
    record = None
    for slot in range(plan.engines, plan.engines + MAX_ENGINES):
        if slot in used_slots:
            continue
        port = req.port if req.port is not None else plan.engine_port(slot)
        if (req.port is None and not can_bind("127.0.0.1", port)) or not can_bind("127.0.0.1", plan.agent_port(slot)):
            continue
        candidate = AddedEngine(
            name=f"engine-agent-{slot + 1}",
            slot=slot,
            instance_id=plan.instance_id_at(port),
            engine_kind=kind,
            model=model_name,
            engine_port=port,
            agent_port=plan.agent_port(slot),
            config=str(plan.run_dir / f"engine-{slot + 1}.toml"),
            placement=placement.describe(),
        )
        if claim_added(plan.run_dir, candidate):
            record = candidate
            break
    if record is None:
        raise ConfigError(f"no free slot for another engine (ports from {plan.engine_port(plan.engines)} are taken)")
    table = plan.added_engine_table(record.engine_port, kind, model_path, model_name, placement, req.vllm_args)
    Path(record.config).write_text(plan.engine_agent_toml(record.slot, model_path, table, record.agent_port))
    log = plan.log_dir / f"{record.name}.log"
    process = ManagedProcess(
        record.name,
        mesh_command(
            "engine",
            "--config",
            record.config,
            "--consul",
            plan.consul_address,
            "--node",
            plan.node,
            "--advertise-address",
            "127.0.0.1",
        ),
        log,
        env=child_env(),
    ).start()
    me = proc_identity(record.name, process.popen.pid)
    record.pid, record.start_ticks = me.pid, me.start_ticks
    write_added(plan.run_dir, record)
    say(
        f"{record.instance_id}: {kind} engine :{record.engine_port} ({placement.describe()}), model {model_name!r}, "
        f"agent http://127.0.0.1:{record.agent_port} (logs {log}, {plan.log_dir}/{record.instance_id}.log)"
    )
    return Started(record, process, log)


def wait_passing(
    mesh: RunningMesh,
    started: list[Started],
    timeout_s: float,
    say: Callable[[str], None],
    stop: threading.Event,
) -> dict[str, float]:
    """Until every started engine passes: instance -> seconds from its start. Reports each verdict
    change (and a line every 15 s); EngineFailed if an agent dies, an engine crash-loops or the time
    is up; Interrupted on `stop`."""
    t0 = time.monotonic()
    seen: dict[str, str] = {}
    done: dict[str, float] = {}
    last_beat = t0
    while True:
        if stop.is_set():
            raise Interrupted()
        now = mesh.entries()
        for s in started:
            iid = s.record.instance_id
            if iid in done:
                continue
            if not s.process.alive():
                tail = "\n".join("      " + line for line in s.process.log_tail(12).splitlines())
                raise EngineFailed(f"{s.record.name} exited with code {s.process.returncode}; log {s.log}:\n{tail}")
            e = now.get(iid)
            state = e.verdict.state.value if e else "not registered yet"
            note = f"{state} ({e.verdict.reason})" if e and e.verdict.reason else state
            if seen.get(iid) != note:
                seen[iid] = note
                say(f"{iid}: {note}")
            if e is not None and e.verdict.cause is VerdictCause.CRASH_LOOP:
                raise EngineFailed(f"{iid}: {e.verdict.reason}; engine log {mesh.plan.log_dir / (iid + '.log')}")
            if state == "passing":
                done[iid] = time.monotonic() - t0
        if len(done) == len(started):
            return done
        waited = time.monotonic() - t0
        if waited > timeout_s:
            late = [s.record.instance_id for s in started if s.record.instance_id not in done]
            raise EngineFailed(f"{', '.join(late)} not passing within {timeout_s:.0f}s")
        if time.monotonic() - last_beat >= HEARTBEAT_S:
            last_beat = time.monotonic()
            say(f"... {waited:.0f}s: " + "; ".join(f"{iid} {seen.get(iid, '?')}" for iid in sorted(seen)))
        stop.wait(POLL_S)


def gateway_weights(plan: MeshPlan) -> dict[str, float]:
    """instance -> its share of new work in the local gateway (ernie_gateway_instance_weight): the
    gateway lists an instance there once it routes to it."""
    try:
        text = httpx.get(f"http://127.0.0.1:{plan.port(GATEWAY_METRICS_PORT)}/metrics", timeout=HTTP_TIMEOUT_S).text
    except httpx.HTTPError:
        return {}
    out = {}
    prefix = WEIGHT_METRIC + '{instance_id="'
    for line in text.splitlines():
        if line.startswith(prefix):
            iid, _, value = line[len(prefix) :].partition('"} ')
            try:
                out[iid] = float(value)
            except ValueError:
                continue
    return out


def wait_routed(plan: MeshPlan, instance_ids: list[str], stop: threading.Event) -> bool:
    """Until the gateway routes to every one of `instance_ids` (False after ROUTE_TIMEOUT_S)."""
    deadline = time.monotonic() + ROUTE_TIMEOUT_S
    while not stop.is_set():
        weights = gateway_weights(plan)
        if all(weights.get(iid, 0.0) > 0 for iid in instance_ids):
            return True
        if time.monotonic() > deadline:
            return False
        stop.wait(POLL_S)
    raise Interrupted()


def abandon(mesh: RunningMesh, started: list[Started], say: Callable[[str], None]) -> None:
    """Stop engines `add` started that will not join (failed, timed out, Ctrl-C) and drop their records."""
    for s in started:
        if s.process.alive():
            say(f"stopping {s.record.instance_id}")
        tree = [proc_identity(f"{s.record.name}/child", pid) for pid in descendants([s.process.popen.pid])]
        s.process.stop(timeout_s=30.0)
        for p in wait_gone(tree, 0.5):
            kill(p, signal.SIGKILL)
        drop_added(mesh.run_dir, s.record.name)


# --- remove ------------------------------------------------------------------------------------


def stop_timeout_s(plan: MeshPlan) -> float:
    """How long an engine agent may take to drain and stop (as for `up`'s stop: parts.py)."""
    return plan.drain_deadline_s + ENGINE_AGENT_STOP_MARGIN_S


def remove_engine(
    mesh: RunningMesh, engine: LocalEngine, say: Callable[[str], None], timeout_s: float | None = None
) -> tuple[float, bool]:
    """Drain `engine` and stop it: SIGTERM to its engine agent alone (it drains, stops the engine,
    deregisters), followed in Consul until the instance is gone and the agent has exited.
    (seconds, whether it had to be killed at the deadline)."""
    timeout_s = timeout_s if timeout_s is not None else stop_timeout_s(mesh.plan)
    t0 = time.monotonic()
    tree = [proc_identity(f"{engine.name}/child", pid) for pid in descendants([engine.proc.pid])]
    if engine.proc.alive():
        os.kill(engine.proc.pid, signal.SIGTERM)  # the agent only: its engine must not get it first
    say(f"draining {engine.instance_id} (requests in flight finish), then stopping it")
    last = ""
    killed = False
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        e = mesh.entries().get(engine.instance_id)
        note = e.verdict.note if e else "deregistered"
        if note != last:
            last = note
            say(f"  {engine.instance_id}: {note}")
        if e is None and not engine.proc.alive():
            break
        time.sleep(POLL_S)
    else:
        say(f"{engine.name} did not stop within {timeout_s:.0f}s: killing it")
        kill(engine.proc, signal.SIGKILL)
        killed = True
    for p in wait_gone(tree, 5.0):
        say(f"left behind, killing: {p.name} (pid {p.pid})")
        kill(p, signal.SIGKILL)
    if engine.added is not None:
        drop_added(mesh.run_dir, engine.name)
    return time.monotonic() - t0, killed


def removal_order(engines: list[LocalEngine]) -> list[LocalEngine]:
    """Which engines `scale` removes first: the added ones, newest first, then `up`'s, last slot first."""
    return sorted(engines, key=lambda e: (e.added is None, -(e.added.added_at if e.added else 0), -e.slot))


def stop_on_signals(say: Callable[[str], None]) -> threading.Event:
    """An event set by SIGINT/SIGTERM/SIGHUP (the waits above end on it: the caller cleans up)."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        say(f"{signal.Signals(signum).name}: stopping")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    return stop


def run_dir_flag(mesh: RunningMesh) -> str:
    """` --run-dir DIR` when the mesh is not in the default run dir (for the commands we suggest)."""
    from agent.local.plan import default_run_dir

    return "" if mesh.run_dir == default_run_dir() else f" --run-dir {mesh.run_dir}"
