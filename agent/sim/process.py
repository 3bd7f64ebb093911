"""`SimEngineProcess`: run one SIMULATED engine as a subprocess (tests, drills, benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
CRASH_EXIT_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
ADMIN_TIMEOUT_S = 5.0
LOG_TAIL_CHARS = 2000
_REPO_ROOT = str(Path(__file__).resolve().parents[2])


class SimEngineError(RuntimeError):
    """The simulated engine did not start, or an admin call failed."""


class SimEngineProcess:
    def __init__(
        self,
        port: int,
        name: str | None = None,
        model: str = "sim-model",
        token_delay_ms: float = 20,
        fault: str = "none",
        shutdown_timeout_s: float = 0,
        host: str = "127.0.0.1",
        log_path: str | None = None,
        extra_args: tuple[str, ...] = (),
        allow_faults: bool = False,
    ) -> None:
        self.port = port
        self.name = name or f"sim-{port}"
        self.model = model
        self.token_delay_ms = token_delay_ms
        self.fault = fault
        self.shutdown_timeout_s = shutdown_timeout_s
        self.host = host
        self.log_path = log_path
        self.extra_args = tuple(extra_args)
        self.allow_faults = allow_faults  # serve /sim/fault (set_fault, get_fault)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self._proc().pid

    @property
    def returncode(self) -> int | None:
        return self._proc().poll()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "agent",
            "sim-engine",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--model",
            self.model,
            "--name",
            self.name,
            "--token-delay-ms",
            str(self.token_delay_ms),
            "--fault",
            self.fault,
            "--shutdown-timeout",
            str(self.shutdown_timeout_s),
            *(["--allow-faults"] if self.allow_faults else []),
            *self.extra_args,
        ]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> SimEngineProcess:
        """Start the subprocess and wait until /health answers 200."""
        if self.proc is not None:
            raise SimEngineError(f"simulated engine {self.name} already started (pid {self.proc.pid})")
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
            os.close(fd)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=1.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise SimEngineError(
                        f"simulated engine {self.name} exited with code {code} during start-up; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    ready = client.get(f"{self.url}/health").status_code == 200
                except httpx.TransportError:
                    ready = False  # not listening yet: poll again until the deadline
                if ready:
                    return self
                if time.monotonic() >= deadline:
                    self.kill()
                    raise SimEngineError(
                        f"simulated engine {self.name} did not answer {self.url}/health within "
                        f"{timeout_s:g} s; log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(POLL_INTERVAL_S)

    def log_tail(self) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        return Path(self.log_path).read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def set_fault(self, mode: str, **params: float) -> dict[str, Any]:
        """Switch the fault mode (POST /sim/fault). For "crash", also waits until the process is gone."""
        self._faults_allowed()
        body = {"mode": mode, **params}
        try:
            r = httpx.post(f"{self.url}/sim/fault", json=body, timeout=ADMIN_TIMEOUT_S)
        except httpx.TransportError:
            if mode == "crash":  # the process may die before the answer arrives
                self.wait(CRASH_EXIT_TIMEOUT_S)
                return body
            raise
        if r.status_code != 200:
            raise SimEngineError(f"POST /sim/fault {body} -> {r.status_code} {r.text}")
        if mode == "crash":
            self.wait(CRASH_EXIT_TIMEOUT_S)
        state: dict[str, Any] = r.json()
        return state

    def _faults_allowed(self) -> None:
        if not self.allow_faults:
            raise SimEngineError(f"simulated engine {self.name} was started without allow_faults: no /sim/fault")

    def get_fault(self) -> dict[str, Any]:
        self._faults_allowed()
        fault: dict[str, Any] = httpx.get(f"{self.url}/sim/fault", timeout=ADMIN_TIMEOUT_S).json()
        return fault

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.url}/sim/stats", timeout=ADMIN_TIMEOUT_S).json()
        return stats

    def terminate(self) -> None:
        """SIGTERM (vLLM-like shutdown: abort or drain, per shutdown_timeout_s)."""
        self._signal(signal.SIGTERM)

    def interrupt(self) -> None:
        self._signal(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL: the process vanishes with its requests."""
        self._signal(signal.SIGKILL)

    def wait(self, timeout_s: float | None = None) -> int:
        """The exit code; raises subprocess.TimeoutExpired if still running after timeout_s."""
        return self._proc().wait(timeout_s)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL if it is still running after timeout_s. Safe to call twice."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait(timeout_s)

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._proc()
        if proc.poll() is None:
            proc.send_signal(sig)

    def _proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise SimEngineError(f"simulated engine {self.name} not started")
        return self.proc

    def __enter__(self) -> SimEngineProcess:
        return self.start() if self.proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
