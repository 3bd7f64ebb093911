"""The naive baseline as a drill system: plain engine processes on fixed ports, nginx round-robin
over them, and healthcheck.py rewriting the upstream list every 10 s."""

from __future__ import annotations

import json
import shlex
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

from agent.local.ports import free_ports, port_open
from agent.local.procs import ManagedProcess
from agent.local.wait import wait_until
from bench.baseline.healthcheck import render_upstream
from bench.engines import EngineSettings, PlainEngine, wait_port_free
from bench.system import CRASH_RESTART_S, Progress, System

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
HEALTH_INTERVAL_S = 10.0
HEALTH_TIMEOUT_S = 5.0


class NginxError(RuntimeError):
    pass


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise NginxError("nginx not found: `apt-get install -y nginx` (scripts/install.sh installs it)")
    return found


class Nginx:
    """Our own nginx: own prefix, config, pid file and loopback port; a non-daemon child process."""

    def __init__(self, prefix: Path, listen_port: int, servers: list[str], workers: str = "auto"):
        self.prefix = Path(prefix)
        self.port = listen_port
        self.servers = servers
        self.workers = workers
        self.conf = self.prefix / "nginx.conf"
        self.upstream = self.prefix / "upstream.conf"
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def base_cmd(self) -> list[str]:
        return [nginx_binary(), "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.prefix / "error.log")]

    def reload_cmd(self) -> str:
        return shlex.join([*self.base_cmd(), "-s", "reload"])

    def start(self) -> Nginx:
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            string.Template(TEMPLATE.read_text()).substitute(
                prefix=str(self.prefix), listen=f"127.0.0.1:{self.port}", workers=self.workers
            )
        )
        self.upstream.write_text(render_upstream(self.servers))
        self.proc = ManagedProcess("nginx", self.base_cmd(), self.prefix / "nginx.stdout.log").start()
        wait_until(lambda: self._up(), 15, interval_s=0.05, what="nginx listening")
        return self

    def _up(self) -> bool:
        proc = self.proc
        if proc is None:
            raise NginxError("nginx was not started")
        if not proc.alive():
            error_log = self.prefix / "error.log"
            err = error_log.read_text(errors="replace")[-1500:] if error_log.exists() else ""
            raise NginxError(f"nginx exited: {proc.log_tail(10)}\n{err}")
        return port_open("127.0.0.1", self.port, 0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(10.0)  # SIGTERM: fast shutdown of master and workers


class BaselineSystem(System):
    name = "baseline"

    def __init__(
        self,
        settings: EngineSettings,
        engines: int,
        workdir: Path,
        progress: Progress,
        health_interval_s: float = HEALTH_INTERVAL_S,
    ):
        super().__init__(settings, engines, workdir, progress)
        ports = free_ports(engines + 1)
        self.engines = [
            PlainEngine(settings, p, self.workdir / "logs", i, engines) for i, p in enumerate(ports[:engines])
        ]
        self.servers = [f"127.0.0.1:{e.port}" for e in self.engines]
        self.nginx = Nginx(self.workdir / "nginx", ports[-1], self.servers)
        self.events = self.workdir / "healthcheck-events.jsonl"
        self.health_interval_s = health_interval_s
        self.health: ManagedProcess | None = None
        self._rotation = frozenset(range(engines))
        self._events_size = 0

    @property
    def base_url(self) -> str:  # type: ignore[override]
        return self.nginx.url

    def describe(self) -> str:
        return (
            f"nginx round-robin on :{self.nginx.port} over {self.servers}, healthcheck.py every "
            f"{self.health_interval_s:g}s"
        )

    def start(self) -> None:
        self.progress(f"baseline: starting {self.n} {self.settings.kind} engine(s)")
        for e in self.engines:
            e.start()
        for e in self.engines:
            e.wait_ready()
        self.nginx.start()
        cmd = [
            sys.executable,
            "-m",
            "bench.baseline.healthcheck",
            "--upstream-file",
            str(self.nginx.upstream),
            "--reload",
            self.nginx.reload_cmd(),
            "--interval",
            f"{self.health_interval_s:g}",
            "--timeout",
            f"{HEALTH_TIMEOUT_S:g}",
            "--events",
            str(self.events),
        ]
        for s in self.servers:
            cmd += ["--engine", s]
        self.health = ManagedProcess("healthcheck", cmd, self.workdir / "logs" / "healthcheck.log").start()
        self.progress(f"baseline: {self.describe()}")

    def stop(self) -> None:
        if self.health is not None:
            self.health.stop(5.0)
        self.nginx.stop()
        for e in self.engines:
            e.stop()

    # --- observation --------------------------------------------------------------------------
    def in_rotation(self) -> frozenset[int]:
        """The engines of the last upstream list nginx reloaded (healthcheck.py's events)."""
        try:
            size = self.events.stat().st_size
        except FileNotFoundError:
            return self._rotation
        if size != self._events_size:
            lines = self.events.read_text().splitlines()
            self._events_size = size
            if lines:
                servers = json.loads(lines[-1])["servers"]
                self._rotation = frozenset(i for i, s in enumerate(self.servers) if s in servers)
        return self._rotation

    def engine_url(self, i: int) -> str:
        return self.engines[i].url

    def engine_pid(self, i: int) -> int | None:
        return self.engines[i].pid

    # --- faults -------------------------------------------------------------------------------
    def kill(self, i: int) -> None:
        self.engines[i].kill()

    def after_kill(self, i: int) -> None:
        wait_port_free(self.engines[i].port)
        self.engines[i].start()

    def restart_crashed(self, i: int, died_at: float) -> None:
        """As systemd's Restart=on-failure with RestartSec=1 would: once the process is gone (an
        API server left without its worker is stopped), CRASH_RESTART_S after it died."""
        e = self.engines[i]
        if e.proc is not None and e.proc.alive():
            try:
                e.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                e.proc.stop(10.0)
        wait_port_free(e.port)
        time.sleep(max(0.0, died_at + CRASH_RESTART_S - time.time()))
        e.start()

    def roll_stop(self, i: int) -> None:
        """`systemctl restart`: SIGTERM with the engine's default shutdown (requests in flight abort)."""
        self.engines[i].terminate()
        wait_port_free(self.engines[i].port)

    def roll_start(self, i: int) -> None:
        self.engines[i].start()

    def roll_wait(self, i: int, timeout_s: float) -> None:
        """The naive operator waits for /health to answer before restarting the next engine."""
        self.engines[i].wait_ready(timeout_s)
