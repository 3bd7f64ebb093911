"""A real `ernie-mesh up` as a subprocess, shared by the up and UI tests (import the fixtures from here).

One real-vLLM mesh per test session: the first test module that asks for `vllm_mesh` starts it
(two CPU engines take minutes), later modules reuse it, and it is stopped when the session ends
unless a test stopped it before (the SIGINT test does). Every mesh runs on shifted ports
(--port-offset) with its own run dir, so a developer's mesh on the default ports is untouched.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from agent.local.plan import MeshPlan
from agent.local.runstate import Proc, descendants, proc_identity, read_state
from agent.net import can_bind

HEALTHY_TIMEOUT_S = 900.0  # two CPU vLLM engines on a loaded 2-core machine
STOP_TIMEOUT_S = 300.0
# Short answers in the UI: CPU engines on a shared 2-core machine make ~5-20 tokens/s.
UI_MAX_TOKENS = "48"
OFFSETS = (20000, 22000, 24000, 26000, 28000, 30000, 32000)


def plan_for(offset: int, run_dir: Path, prometheus: bool = False, **kw) -> MeshPlan:
    """The plan of a test mesh: without Prometheus (and so without the dashboard) unless asked."""
    return MeshPlan(port_offset=offset, run_dir=run_dir, prometheus=prometheus, **kw)


def ports_free(plan: MeshPlan) -> list[int]:
    """The planned ports that something listens on (empty when all are free)."""
    return [port for host, _what, port in plan.ports() if not can_bind(host, port)]


def free_offset(run_dir: Path, exclude: tuple[int, ...] = (), **kw) -> int:
    for offset in OFFSETS:
        if offset not in exclude and not ports_free(plan_for(offset, run_dir, **kw)):
            return offset
    raise RuntimeError(f"no free port range among offsets {OFFSETS}")


class UpRun:
    """`python -m agent up --json ...` in the background; its JSON events arrive on a queue."""

    def __init__(
        self,
        run_dir: Path,
        offset: int,
        *args: str,
        engines: int = 2,
        kind: str = "vllm",
        ui: bool = True,
        dashboard: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.plan = plan_for(offset, self.run_dir, prometheus=dashboard, engines=engines, engine_kind=kind, ui=ui)
        cmd = [
            sys.executable,
            "-m",
            "agent",
            "up",
            "--json",
            "--engines",
            str(engines),
            "--engine-kind",
            kind,
            "--port-offset",
            str(offset),
            "--run-dir",
            str(self.run_dir),
            *(() if dashboard else ("--no-prometheus",)),  # the dashboard needs Prometheus
            *args,
        ]
        if not ui:
            cmd.append("--no-ui")
        self.stderr_path = self.run_dir / "up.stderr"
        self._stderr = open(self.stderr_path, "ab")
        self.started_at = time.monotonic()
        env = {**os.environ, "ERNIE_MESH_MAX_TOKENS": UI_MAX_TOKENS}  # up passes it on to the UI
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=str(Path(__file__).resolve().parents[2]),
        )
        self.events: queue.Queue = queue.Queue()
        self.healthy: dict | None = None
        self.healthy_after_s: float | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "garbage", "line": line.decode(errors="replace")})
        self.events.put({"event": "eof"})

    def stderr_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def next_event(self, timeout_s: float) -> dict:
        try:
            return self.events.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(
                f"`up` printed no JSON event within {timeout_s:.0f}s; stderr:\n{self.stderr_tail()}"
            ) from None

    def wait_healthy(self, timeout_s: float = HEALTHY_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            ev = self.next_event(max(deadline - time.monotonic(), 0.1))
            if ev.get("event") == "healthy":
                self.healthy = ev
                self.healthy_after_s = time.monotonic() - self.started_at
                return ev
            if ev.get("event") in ("failed", "error", "stopped", "eof"):
                raise AssertionError(f"`up` did not become healthy: {ev}; stderr:\n{self.stderr_tail()}")

    # --- what the mesh is made of ------------------------------------------------------------------

    def processes(self) -> list[Proc]:
        """`up`, every process its state file names, and all their descendants now (vLLM, engine cores, Envoy)."""
        out = {self.proc.pid: proc_identity("up", self.proc.pid)}
        state = read_state(self.plan.state_path)
        for p in state.procs() if state else []:
            out.setdefault(p.pid, p)
        for pid in descendants(list(out)):
            out.setdefault(pid, proc_identity(f"descendant {pid}", pid))
        return [p for p in out.values() if p.start_ticks >= 0]

    def agent_instances(self) -> dict[str, dict]:
        out = {}
        for i in range(self.plan.engines):
            r = httpx.get(f"http://127.0.0.1:{self.plan.agent_port(i)}/instances", timeout=5)
            out.update({x["id"]: x for x in r.json()["instances"]})
        return out

    def kill_engine(self, instance_id: str) -> None:
        """kill -9 of an instance's vLLM server and all its processes (engine core, worker)."""
        pid = self.agent_instances()[instance_id]["pid"]
        for p in [pid, *descendants([pid])]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone with its parent

    # --- stopping ------------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"`up` still running {timeout_s:.0f}s after the stop signal; stderr:\n{self.stderr_tail()}"
            ) from None

    def events_until_eof(self, timeout_s: float = 10.0) -> list[dict]:
        out = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if ev.get("event") == "eof":
                break
            out.append(ev)
        return out

    def shutdown(self) -> None:
        """Teardown: SIGINT, wait, and kill whatever is left (never leave a mesh behind)."""
        procs = self.processes() if self.proc.poll() is None else []
        self.signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for p in procs:
            if p.alive():
                try:
                    os.killpg(p.pid, signal.SIGKILL) if os.getpgid(p.pid) == p.pid else os.kill(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self._stderr.close()


def chat_stream(mesh: UpRun, model: str, prompt: str, max_tokens: int, on_chunk=None) -> dict:
    """A temperature-0 chat stream through the gateway, asking for token IDs (so that the test
    knows the splice); returns what the client saw."""
    client = openai.OpenAI(base_url=mesh.plan.api_url, api_key=mesh.plan.api_key(), timeout=300, max_retries=0)
    seen = {
        "ids": set(),
        "text": [],
        "token_ids": [],
        "prompt_token_ids": None,
        "finish": None,
        "usage": None,
        "instances": [],
        "splices": [],
        "max_gap_s": 0.0,
        "first_instance": None,
    }
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": prompt}],
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    seen["first_instance"] = raw.headers.get("x-ernie-instance")
    last = time.monotonic()
    for chunk in raw.parse():
        now = time.monotonic()
        seen["max_gap_s"], last = max(seen["max_gap_s"], now - last), now
        seen["ids"].add(chunk.id)
        extra = chunk.model_extra or {}
        if extra.get("prompt_token_ids"):
            seen["prompt_token_ids"] = extra["prompt_token_ids"]
        for c in chunk.choices:
            seen["text"].append(c.delta.content or "")
            seen["token_ids"] += (c.model_extra or {}).get("token_ids") or []
            if c.finish_reason:
                seen["finish"] = c.finish_reason
                seen["instances"] = extra.get("ernie_instances", [])
                seen["splices"] = extra.get("ernie_splices", [])
        if chunk.usage is not None:
            seen["usage"] = chunk.usage
        if on_chunk is not None:
            on_chunk(seen)
    seen["text"] = "".join(seen["text"])
    return seen


_SIM_MESH: UpRun | None = None


@pytest.fixture(scope="session")
def sim_mesh(request, tmp_path_factory):
    """The session's shared SIMULATED mesh with Prometheus and the dashboard (no UI): the up, dashboard
    and `top` tests that leave it running read it; tests that stop a mesh start their own."""
    global _SIM_MESH
    if _SIM_MESH is None:
        run_dir = tmp_path_factory.mktemp("up-sim")
        offset = free_offset(run_dir, engine_kind="simulated", ui=False, prometheus=True)
        run = UpRun(run_dir, offset, kind="simulated", ui=False, dashboard=True)
        request.session.config.add_cleanup(run.shutdown)
        run.wait_healthy(180)
        _SIM_MESH = run
    return _SIM_MESH


_VLLM_MESH: UpRun | None = None
_VLLM_MESH_ERROR: str | None = None


@pytest.fixture(scope="session")
def vllm_mesh(request, tmp_path_factory):
    """The session's one real mesh: `ernie-mesh up` with two real vLLM engines (CPU) and the UI.

    Imported by several modules, this fixture is defined once per module; the module-level
    singleton keeps it to one `up` run, stopped when the session ends.
    """
    global _VLLM_MESH, _VLLM_MESH_ERROR
    if _VLLM_MESH_ERROR:
        pytest.fail(f"the shared mesh failed to start earlier: {_VLLM_MESH_ERROR}")
    if _VLLM_MESH is None:
        run_dir = tmp_path_factory.mktemp("up-vllm")
        run = UpRun(run_dir, free_offset(run_dir))
        request.session.config.add_cleanup(run.shutdown)
        try:
            run.wait_healthy()
        except AssertionError as e:
            _VLLM_MESH_ERROR = str(e).splitlines()[0]
            run.shutdown()
            raise
        _VLLM_MESH = run
        print(f"\n[up] real mesh healthy after {run.healthy_after_s:.0f}s (two vLLM engines, CPU)")
    return _VLLM_MESH
