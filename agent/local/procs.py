"""Child processes the local tools start (`up`, tests, drills): logged to a file, stopped cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from agent.local.runstate import Proc, kill, wait_gone

STOP_TIMEOUT_S = 60.0


class ManagedProcess:
    def __init__(
        self,
        name: str,
        cmd: list[str],
        log_path: str | os.PathLike[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ):
        self.name = name
        self.cmd = cmd
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        """The process start() launched (running or exited)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.proc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (the process drains/cleans up), then SIGKILL of its whole group if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()
        return self.proc.wait()

    def kill_group(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the process itself only (a crash), leaving its children as a crash would."""
        if self.alive():
            self.popen.kill()
            self.popen.wait()

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Stoppable(Protocol):
    """What `up` needs to stop a process: a ManagedProcess, or an AdoptedProcess."""

    name: str

    @property
    def pid(self) -> int | None: ...

    def alive(self) -> bool: ...

    def signal(self, sig: int) -> None: ...

    def kill_group(self) -> None: ...

    def wait(self, timeout_s: float) -> int: ...


class AdoptedProcess:
    """A process of the mesh that is not our child (an engine agent `ernie-mesh add` started),
    stopped like one: signalled only while it is still the recorded process."""

    def __init__(self, proc: Proc):
        self.proc = proc
        self.name = proc.name

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.alive()

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def kill_group(self) -> None:
        kill(self.proc, signal.SIGKILL)

    def wait(self, timeout_s: float) -> int:
        if wait_gone([self.proc], timeout_s):
            raise subprocess.TimeoutExpired(self.name, timeout_s)
        return 0


def mesh_command(*args: str) -> list[str]:
    """`ernie-mesh ARGS` run with this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "agent", *args]


def child_env() -> dict[str, str]:
    """The environment over ours of the agents the local mesh starts: they log at INFO into their
    files (the flags we pass win over CONSUL_HTTP_ADDR & co.); each uses its role's Consul token
    file, not a token of the user's environment."""
    return {"ERNIE_MESH_LOG_LEVEL": "INFO", "CONSUL_HTTP_TOKEN": "", "CONSUL_HTTP_TOKEN_FILE": ""}
