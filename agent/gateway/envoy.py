"""Start, supervise, adopt and stop the gateway's Envoy; a small client for its admin API.

Envoy runs in its own session, so it outlives the agent: if the agent is killed, Envoy keeps
serving its last endpoints. A restarted agent adopts it (pid and bootstrap digest in
run_dir/envoy.json) instead of starting a second one; Envoy's ADS client reconnects within a
second (bootstrap retry_policy) and receives the current snapshot. A running Envoy whose
bootstrap differs from the newly rendered one is replaced (drained, then stopped).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.gateway import bootstrap
from agent.gateway.config import GatewayConfig

log = logging.getLogger(__name__)

ADMIN_TIMEOUT_S = 1.0
STOP_TIMEOUT_S = 10.0
STABLE_AFTER_S = 60.0  # an Envoy up this long resets the restart backoff
LOG_TAIL_LINES = 8


class EnvoyAdmin:
    """Envoy's admin API (loopback). Every call is bounded by a short timeout."""

    def __init__(self, url: str, timeout_s: float = ADMIN_TIMEOUT_S):
        self.url = url.rstrip("/")
        self._http = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def ready(self) -> bool:
        try:
            return self._http.get(f"{self.url}/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def server_info(self) -> dict[str, Any] | None:
        try:
            r = self._http.get(f"{self.url}/server_info")
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def stats(self, contains: str = "") -> dict[str, int]:
        """Counters and gauges whose name contains `contains`, as ints."""
        params = {"filter": contains} if contains else {}
        r = self._http.get(f"{self.url}/stats", params=params)
        r.raise_for_status()
        out: dict[str, int] = {}
        for line in r.text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def hosts(self, cluster: str) -> dict[str, dict[str, str]]:
        """The cluster's hosts: hostname (instance ID) -> {address, health_flags, rq_active, ...}."""
        r = self._http.get(f"{self.url}/clusters")
        r.raise_for_status()
        by_addr: dict[str, dict[str, str]] = {}
        prefix = f"{cluster}::"
        for line in r.text.splitlines():
            if not line.startswith(prefix):
                continue
            parts = line[len(prefix) :].split("::")
            if len(parts) != 3 or ":" not in parts[0]:
                continue
            addr, key, value = parts
            by_addr.setdefault(addr, {"address": addr})[key] = value
        return {h.get("hostname") or addr: h for addr, h in by_addr.items()}

    def post(self, path: str) -> int:
        try:
            return self._http.post(f"{self.url}{path}").status_code
        except httpx.HTTPError:
            return 0


@dataclass(frozen=True)
class EnvoyRecord:
    """What the agent leaves in run_dir/envoy.json so that its successor can adopt Envoy."""

    pid: int
    bootstrap_path: str
    bootstrap_digest: str
    admin_url: str
    started_unix: float


def _proc_state(pid: int) -> str:
    """'' if no such process, else its state letter (Z = zombie, i.e. gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[0]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class EnvoySupervisor:
    """Keeps one Envoy running. `ensure()` is called by the agent's control loop and never blocks
    for long: a dead Envoy is restarted after a capped exponential backoff."""

    def __init__(
        self,
        cfg: GatewayConfig,
        binary: str,
        template_text: str,
        on_restart: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self.binary = binary
        self.on_restart = on_restart
        self.clock = clock
        self.run_dir = Path(cfg.run_dir)
        self.bootstrap_path = self.run_dir / "bootstrap.yaml"
        self.state_path = self.run_dir / "envoy.json"
        self.log_path = self.run_dir / "envoy.log"
        self.bootstrap_text = bootstrap.render(template_text, cfg)
        self.digest = bootstrap.digest(self.bootstrap_text)
        self.admin = EnvoyAdmin(cfg.admin_url)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.adopted = False
        self.started_at: float | None = None
        self.starts = 0
        self.next_start_at: float | None = None
        self.last_exit = ""
        self._backoff_s = cfg.envoy_restart_backoff_initial_s
        self._stopping = False

    # --- start / adopt ------------------------------------------------------------------------

    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        Path(self.cfg.socket_dir).mkdir(parents=True, exist_ok=True, mode=0o700)  # the engine hop's socket
        tmp = self.bootstrap_path.with_suffix(".tmp")
        tmp.write_text(self.bootstrap_text)
        os.replace(tmp, self.bootstrap_path)

    def command(self) -> list[str]:
        # --disable-hot-restart (measured on 1.40): with hot restart enabled Envoy exits when its
        # parent process dies, so it could not outlive a killed agent; and without the hot-restart
        # shared memory nothing is keyed by --base-id, so gateways run side by side without one.
        cmd = [
            self.binary,
            "-c",
            str(self.bootstrap_path),
            "--disable-hot-restart",
            "-l",
            self.cfg.envoy_log_level,
            "--log-path",
            str(self.log_path),
            "--drain-time-s",
            str(max(int(self.cfg.envoy_drain_s), 1)),
        ]
        if self.cfg.envoy_concurrency:
            cmd += ["--concurrency", str(self.cfg.envoy_concurrency)]
        return cmd

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid, self.adopted = self.proc.pid, False
        self.started_at = self.clock()
        self.starts += 1
        self._write_record()
        log.info(
            "envoy started: pid %d, listen %s, admin %s, log %s",
            self.pid,
            self.cfg.listen,
            self.cfg.admin_url,
            self.log_path,
        )

    def _write_record(self) -> None:
        rec = EnvoyRecord(self.pid or 0, str(self.bootstrap_path), self.digest, self.cfg.admin_url, time.time())
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec.__dict__))
        os.replace(tmp, self.state_path)

    def _read_record(self) -> EnvoyRecord | None:
        try:
            return EnvoyRecord(**json.loads(self.state_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _is_our_envoy(self, rec: EnvoyRecord) -> bool:
        state = _proc_state(rec.pid)
        return state not in ("", "Z") and rec.bootstrap_path in _cmdline(rec.pid)

    def adopt_or_start(self) -> str:
        """At agent start: adopt the Envoy a previous agent left running, or start one."""
        self.prepare()
        rec = self._read_record()
        if rec is not None and self._is_our_envoy(rec):
            if (
                rec.bootstrap_digest == self.digest
                and rec.admin_url == self.cfg.admin_url
                and self.admin.server_info() is not None
            ):
                self.pid, self.adopted, self.started_at = rec.pid, True, self.clock()
                log.info("adopted the running envoy (pid %d) left by a previous agent", rec.pid)
                return "adopted"
            log.warning("a running envoy (pid %d) has another bootstrap: replacing it (drain, stop, start)", rec.pid)
            self._terminate(rec.pid, EnvoyAdmin(rec.admin_url))
        self._spawn()
        return "started"

    # --- supervision --------------------------------------------------------------------------

    def alive(self) -> bool:
        if self.pid is None:
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        return _proc_state(self.pid) not in ("", "Z")

    def ensure(self) -> str:
        """One supervision step: 'running', 'restarting in Ns', 'restarted'."""
        now = self.clock()
        if self.alive():
            if self.started_at is not None and now - self.started_at > STABLE_AFTER_S:
                self._backoff_s = self.cfg.envoy_restart_backoff_initial_s
            return "running"
        if self._stopping:
            return "stopped"
        if self.next_start_at is None:
            code = self.proc.returncode if self.proc is not None else None
            self.last_exit = f"exit code {code}" if code is not None else "gone"
            log.error(
                "envoy (pid %s) died (%s); restarting in %.1fs. Last log lines:\n%s",
                self.pid,
                self.last_exit,
                self._backoff_s,
                self.log_tail(),
            )
            self.next_start_at = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self.cfg.envoy_restart_backoff_max_s)
        if now < self.next_start_at:
            return f"restarting in {self.next_start_at - now:.1f}s"
        self.next_start_at = None
        self.prepare()
        self._spawn()
        if self.on_restart:
            self.on_restart()
        return "restarted"

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "  (no envoy log)"
        return "\n".join(f"  {line}" for line in lines[-LOG_TAIL_LINES:]) or "  (empty envoy log)"

    # --- stop -----------------------------------------------------------------------------------

    def stop(self, drain_s: float | None = None) -> None:
        """Drain (stop taking connections, let in-flight requests finish up to drain_s), then stop."""
        self._stopping = True
        if self.pid is not None and self.alive():
            self._terminate(self.pid, self.admin, drain_s)
        try:
            self.state_path.unlink()
        except FileNotFoundError:
            pass  # never started, or already cleaned up
        self.admin.close()

    def _terminate(self, pid: int, admin: EnvoyAdmin, drain_s: float | None = None) -> None:
        drain_s = self.cfg.envoy_drain_s if drain_s is None else drain_s
        if drain_s > 0 and admin.post("/drain_listeners?graceful&inboundonly") == 200:
            deadline = self.clock() + drain_s
            while self.clock() < deadline:
                try:
                    active = admin.stats("downstream_rq_active").get("http.openai_api.downstream_rq_active", 0)
                except httpx.HTTPError:
                    break
                if active == 0:
                    break
                time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = self.clock() + STOP_TIMEOUT_S
        while self.clock() < deadline:
            if self.proc is not None and self.proc.pid == pid:
                if self.proc.poll() is not None:
                    return
            elif _proc_state(pid) in ("", "Z"):
                return
            time.sleep(0.05)
        log.warning("envoy pid %d ignored SIGTERM for %.0fs: killing it", pid, STOP_TIMEOUT_S)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # exited just now
        if self.proc is not None and self.proc.pid == pid:
            self.proc.wait(5)
