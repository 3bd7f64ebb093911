"""Engines for the drills: settings shared by both systems, the baseline's plain engine processes,
and the faults (freeze, slow) applied the same way whichever system runs the engine.

Simulated engines (`ernie-mesh sim-engine`, NOT vLLM) drive faults deterministically; real vLLM
(CPU build) engines are used for the kill and rolling drills where vLLM itself is the point.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from agent.local.procs import ManagedProcess, mesh_command
from agent.local.wait import wait_until

SIM_MODEL = "sim-model"
VLLM_START_TIMEOUT_S = 600.0
SIM_START_TIMEOUT_S = 30.0
ENGINE_CORE_TITLE = "EngineCore"
# Simulated engines in the drills crash on a request that contains this (the prompt-of-death drill);
# the load's own prompt never does.
PROMPT_OF_DEATH = "ERNIE-DRILL-PROMPT-OF-DEATH"


@dataclass(frozen=True)
class EngineSettings:
    """One engine's settings; both systems get the same ones."""

    kind: str = "sim"  # sim | vllm
    token_delay_ms: float = 20.0  # simulated engine only
    model: str = ""  # vLLM: model path
    served_model_name: str = SIM_MODEL
    # vLLM's default is 0: SIGTERM aborts requests in flight. The baseline keeps that default (a plain
    # restart); the mesh never SIGTERMs an engine with requests in flight (it drains first).
    shutdown_timeout_s: float = 0.0
    vllm_args: tuple[str, ...] = ()
    vllm_env: dict[str, str] = field(default_factory=dict)
    sim_args: tuple[str, ...] = ()  # more simulated-engine flags (e.g. its prefix cache's)

    @property
    def start_timeout_s(self) -> float:
        return VLLM_START_TIMEOUT_S if self.kind == "vllm" else SIM_START_TIMEOUT_S

    def command(self, port: int) -> list[str]:
        """The command a user would run for this engine (the baseline runs exactly this)."""
        if self.kind == "sim":
            return mesh_command(
                "sim-engine",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model",
                self.served_model_name,
                "--token-delay-ms",
                f"{self.token_delay_ms:g}",
                "--shutdown-timeout",
                f"{self.shutdown_timeout_s:g}",
                "--crash-on-prompt",
                PROMPT_OF_DEATH,
                "--allow-faults",  # the drills freeze and slow engines through /sim/fault
                *self.sim_args,
            )
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--served-model-name",
            self.served_model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--shutdown-timeout",
            str(int(self.shutdown_timeout_s)),
            *self.vllm_args,
        ]

    def env(self, index: int, count: int) -> dict[str, str]:
        """Environment of engine number `index` of `count` (vLLM on CPU: its own share of the cores)."""
        from agent.local.defaults import cpu_bind_env

        return {**self.vllm_env, **cpu_bind_env(index, count)} if self.kind == "vllm" else {}

    def agent_engine(self, port: int, index: int, count: int) -> dict[str, Any]:
        """The [[engines]] table of an engine agent running engine number `index` of `count`."""
        if self.kind == "sim":
            return {
                "kind": "simulated",
                "port": port,
                "served_model_name": self.served_model_name,
                "args": [
                    "--token-delay-ms",
                    f"{self.token_delay_ms:g}",
                    "--crash-on-prompt",
                    PROMPT_OF_DEATH,
                    "--allow-faults",
                    *self.sim_args,
                ],
                "shutdown_timeout_s": self.shutdown_timeout_s,
            }
        return {
            "kind": "vllm",
            "port": port,
            "model": self.model,
            "served_model_name": self.served_model_name,
            "args": list(self.vllm_args),
            "env": self.env(index, count),
            "shutdown_timeout_s": self.shutdown_timeout_s,
        }


def sim_settings(token_delay_ms: float = 20.0) -> EngineSettings:
    return EngineSettings(kind="sim", token_delay_ms=token_delay_ms)


def vllm_settings(progress: Callable[[str], None] = print) -> EngineSettings:
    """Real vLLM, CPU flags from agent.local.defaults, the embedded default model."""
    from agent.local.defaults import vllm_engine
    from agent.model import SERVED_MODEL_NAME, prepare_default_model

    model = str(prepare_default_model(progress=progress))
    table = vllm_engine(0, model, SERVED_MODEL_NAME)
    return EngineSettings(
        kind="vllm",
        model=model,
        served_model_name=SERVED_MODEL_NAME,
        vllm_args=tuple(table.get("args", ())),
        vllm_env=dict(table.get("env", {})),
    )


# --- faults, the same for both systems ----------------------------------------------------------


def engine_core(pid: int) -> psutil.Process:
    """vLLM's engine-core worker: a child of the API server named VLLM::EngineCore."""
    children = psutil.Process(pid).children(recursive=True)
    for p in children:
        try:
            if ENGINE_CORE_TITLE in p.name() or any(ENGINE_CORE_TITLE in a for a in p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    raise RuntimeError(f"no {ENGINE_CORE_TITLE} child under pid {pid} (children: {[c.pid for c in children]})")


def set_sim_fault(url: str, mode: str, **params: object) -> None:
    r = httpx.post(f"{url}/sim/fault", json={"mode": mode, **params}, timeout=5)
    r.raise_for_status()


def freeze(settings: EngineSettings, url: str, pid: int | None) -> None:
    """Gray failure: /health keeps answering 200, generation stops."""
    if settings.kind == "sim":
        set_sim_fault(url, "hang")
    else:
        engine_core(_running_pid(url, pid)).send_signal(signal.SIGSTOP)


def thaw(settings: EngineSettings, url: str, pid: int | None) -> None:
    if settings.kind == "sim":
        set_sim_fault(url, "none")
    else:
        engine_core(_running_pid(url, pid)).send_signal(signal.SIGCONT)


def _running_pid(url: str, pid: int | None) -> int:
    # psutil.Process(None) would be this process: never look for an engine core among our own children
    if pid is None:
        raise RuntimeError(f"the engine at {url} has no running process")
    return pid


def slow_down(settings: EngineSettings, url: str, factor: float) -> None:
    if settings.kind != "sim":
        raise NotImplementedError("the slow drill needs the simulated engine (vLLM has no speed knob)")
    set_sim_fault(url, "slow", slow_factor=factor)


def speed_up(settings: EngineSettings, url: str) -> None:
    set_sim_fault(url, "none")


def kill_worker(settings: EngineSettings, url: str, pid: int | None) -> None:
    """An OOM kill: SIGKILL of the process that runs the model, alone (vLLM: its EngineCore; the
    simulated engine is a single process: that one), not its parent, group or supervisor."""
    pid = _running_pid(url, pid)
    if settings.kind == "vllm":
        engine_core(pid).kill()
    else:
        os.kill(pid, signal.SIGKILL)


def kill_group(pid: int | None) -> None:
    """kill -9 of the engine and its children (vLLM's engine core dies with it, as in an OOM kill)."""
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def listening_pid(port: int) -> int | None:
    """The process listening on TCP `port` (one of this user's), or None."""
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
                return c.pid
    except psutil.Error:
        return None
    return None


_COUNTER_RE = re.compile(r"^vllm:request_success_total(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.M)


def completed_requests(settings: EngineSettings, url: str) -> float | None:
    """Requests this engine finished so far (None if it does not answer): shows it serves again."""
    try:
        if settings.kind == "sim":
            return float(httpx.get(f"{url}/sim/stats", timeout=1).json()["completed"])
        text = httpx.get(f"{url}/metrics", timeout=1).text
        return sum(float(m) for m in _COUNTER_RE.findall(text))
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def health_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def model_ready(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return health_ok(url, timeout_s) and httpx.get(f"{url}/v1/models", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


class PlainEngine:
    """One engine run the naive way: a process on a fixed port, no supervisor (the baseline)."""

    def __init__(self, settings: EngineSettings, port: int, log_dir: Path, index: int, count: int):
        self.settings = settings
        self.port = port
        self.index, self.count = index, count
        self.log_dir = Path(log_dir)
        self.proc: ManagedProcess | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.alive() else None

    def start(self) -> PlainEngine:
        self.starts += 1
        self.proc = ManagedProcess(
            f"engine-{self.port}",
            self.settings.command(self.port),
            self.log_dir / f"engine-{self.port}.log",
            env=self.settings.env(self.index, self.count),
        ).start()
        return self

    def wait_ready(self, timeout_s: float | None = None) -> None:
        timeout_s = timeout_s or self.settings.start_timeout_s

        def ready() -> bool:
            proc = self.proc
            if proc is None:
                raise RuntimeError(f"engine on :{self.port} was not started")
            if not proc.alive():
                raise RuntimeError(f"engine on :{self.port} exited: {proc.log_tail(15)}")
            return model_ready(self.url)

        wait_until(ready, timeout_s, interval_s=0.2, what=f"engine :{self.port} ready")

    def kill(self) -> None:
        kill_group(self.pid)
        if self.proc and self.proc.proc:
            self.proc.proc.wait()

    def terminate(self, timeout_s: float = 60.0) -> None:
        """A plain restart's first half (`systemctl restart`): SIGTERM, wait, then SIGKILL."""
        if self.proc is not None:
            self.proc.stop(timeout_s)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(15.0)


def wait_port_free(port: int, timeout_s: float = 30.0) -> None:
    from agent.local.ports import port_open

    deadline = time.monotonic() + timeout_s
    while port_open("127.0.0.1", port, 0.2) and time.monotonic() < deadline:
        time.sleep(0.1)
