"""Start, supervise, adopt, replace and stop the gateway's Envoy; a small client for its admin API.

Envoy runs in its own session under a keeper process (envoy_keeper.py: Envoy asks for SIGTERM
when its parent dies), so it outlives the agent: if the agent dies or is re-executed (SIGHUP),
Envoy keeps serving its last endpoints. A restarted agent adopts it (pid, bootstrap
digest and hot-restart base ID in run_dir/envoy.json) instead of starting a second one; Envoy's
ADS client reconnects within a second (bootstrap retry_policy) and receives the current snapshot.

A running Envoy whose bootstrap differs from the newly rendered one (a policy change, an upgrade)
is replaced by Envoy's hot restart: the new process takes over the listening sockets (no client
is refused), the old one stops accepting and finishes what it carries until the new one shuts it
down at the drain deadline (`drain_deadline_s`, Envoy's --parent-shutdown-time-s). Envoy keeps two
generations at most (a third start ends the first at once, measured on 1.40), and the old one
must not be stopped by anyone else (its successor aborts when it loses it): a second change
while one drains waits until the first has finished. A graceful stop drains the same way:
in-flight requests get up to the drain deadline.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent import pids
from agent.gateway import bootstrap, restarts
from agent.gateway.config import GatewayConfig
from agent.gateway.restarts import RestartBackoff

log = logging.getLogger(__name__)

ADMIN_TIMEOUT_S = 1.0
STOP_TIMEOUT_S = 10.0
# Envoy's --drain-time-s: how long a draining Envoy asks clients to go elsewhere (HTTP/1
# `Connection: close`, HTTP/2 GOAWAY) before it closes idle connections at the deadline.
DRAIN_ANNOUNCE_S = 5
STABLE_AFTER_S = 60.0  # an Envoy up this long resets the restart backoff
KEEPER_EXIT_WAIT_S = 1.0
LOG_TAIL_LINES = 8
KEEPER = Path(__file__).with_name("envoy_keeper.py")
# Never inherited by Envoy (nor by the relays, agent/gateway/relays.py): it needs no Consul access.
SECRET_ENV = frozenset({"CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_AUTH"})


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
        return self.clusters_hosts(lambda name: name == cluster).get(cluster, {})

    def clusters_hosts(self, wanted: Callable[[str], bool]) -> dict[str, dict[str, dict[str, str]]]:
        """The hosts of every cluster whose name is `wanted`: cluster -> hostname -> {...} (one read)."""
        r = self._http.get(f"{self.url}/clusters")
        r.raise_for_status()
        by_addr: dict[str, dict[str, dict[str, str]]] = {}
        for line in r.text.splitlines():
            cluster, sep, rest = line.partition("::")
            if not sep or not wanted(cluster):
                continue
            parts = rest.split("::")
            if len(parts) != 3 or ":" not in parts[0]:
                continue
            addr, key, value = parts
            by_addr.setdefault(cluster, {}).setdefault(addr, {"address": addr})[key] = value
        return {c: {h.get("hostname") or a: h for a, h in hosts.items()} for c, hosts in by_addr.items()}

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
    base_id_path: str = ""  # where Envoy wrote its hot-restart base ID ("" = hot restart disabled)
    restart_epoch: int = 0
    predecessor_pid: int = 0  # the Envoy this one replaced by hot restart (it drains until it exits)
    keeper_pid: int = 0  # Envoy's parent (envoy_keeper.py)


class EnvoySupervisor:
    """Keeps one Envoy running. `ensure()` is called by the agent's control loop and never blocks
    for long: a dead Envoy is restarted after a capped exponential backoff, and the predecessor
    of a hot restart is stopped once it carries nothing."""

    def __init__(
        self,
        cfg: GatewayConfig,
        binary: str,
        template_text: str,
        on_restart: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self.binary = binary
        self.on_restart = on_restart
        self.on_exit = on_exit  # called from a thread the moment the running Envoy exits
        self.clock = clock
        self.run_dir = Path(cfg.run_dir)
        self.bootstrap_path = self.run_dir / "bootstrap.yaml"
        self.state_path = self.run_dir / "envoy.json"
        self.log_path = self.run_dir / "envoy.log"
        self.base_id_path = self.run_dir / "envoy.base-id"
        self.bootstrap_text = bootstrap.render(template_text, cfg)
        self.digest = bootstrap.digest(self.bootstrap_text)
        self.admin = EnvoyAdmin(cfg.admin_url)
        self.proc: subprocess.Popen[bytes] | None = None  # the keeper, Envoy's parent
        self.pid: int | None = None  # Envoy's
        self.keeper_pid = 0
        self.epoch = 0
        self.adopted = False
        self.started_at: float | None = None
        self.starts = 0
        self.next_start_at: float | None = None
        self.last_exit = ""
        # the Envoy a hot restart replaced: still finishing its requests
        self.predecessor: int | None = None
        # a new bootstrap waiting for the predecessor to exit before its hot restart
        self.hot_restart_pending = False
        self.backoff = RestartBackoff(
            cfg.envoy_restart_backoff_initial_s, cfg.envoy_restart_backoff_max_s, STABLE_AFTER_S
        )
        self._stopping = False

    # --- start / adopt / replace ----------------------------------------------------------------

    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        Path(self.cfg.socket_dir).mkdir(parents=True, exist_ok=True, mode=0o700)  # the engine hop's socket
        tmp = self.bootstrap_path.with_suffix(".tmp")
        tmp.write_text(self.bootstrap_text)
        os.replace(tmp, self.bootstrap_path)

    def command(self, epoch: int = 0, base_id: int | None = None) -> list[str]:
        """Envoy's command line. Epoch 0 picks a free hot-restart base ID (gateways side by side do
        not collide) and writes it to run_dir; a hot restart passes it on with the next epoch."""
        cmd = [
            self.binary,
            "-c",
            str(self.bootstrap_path),
            "-l",
            self.cfg.envoy_log_level,
            "--log-path",
            str(self.log_path),
            "--drain-time-s",
            str(DRAIN_ANNOUNCE_S),
            # a hot restart's predecessor exits at this deadline at the latest
            "--parent-shutdown-time-s",
            str(max(int(self.cfg.drain_deadline_s), DRAIN_ANNOUNCE_S + 1)),
        ]
        if epoch == 0:
            cmd += ["--use-dynamic-base-id", "--base-id-path", str(self.base_id_path)]
        else:
            cmd += ["--base-id", str(base_id), "--restart-epoch", str(epoch)]
        if self.cfg.envoy_concurrency:
            cmd += ["--concurrency", str(self.cfg.envoy_concurrency)]
        return cmd

    def _spawn(self, epoch: int = 0, base_id: int | None = None) -> None:
        if epoch == 0:
            self.base_id_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(KEEPER), *self.command(epoch, base_id)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={k: v for k, v in os.environ.items() if k not in SECRET_ENV},  # Envoy needs no Consul access
        )
        assert self.proc.stdout is not None
        with self.proc.stdout:
            line = self.proc.stdout.readline()  # the keeper writes Envoy's pid right after the fork
        self.pid, self.keeper_pid = int(line), self.proc.pid
        self.epoch, self.adopted = epoch, False
        self.started_at = self.clock()
        self.starts += 1
        self._write_record()
        self._watch_exit()
        log.info(
            "envoy started: pid %d (hot-restart epoch %d), listen %s, admin %s, log %s",
            self.pid,
            epoch,
            self.cfg.listen,
            self.cfg.admin_url,
            self.log_path,
        )

    def _write_record(self) -> None:
        rec = EnvoyRecord(
            self.pid or 0,
            str(self.bootstrap_path),
            self.digest,
            self.cfg.admin_url,
            time.time(),
            str(self.base_id_path),
            self.epoch,
            self.predecessor or 0,
            self.keeper_pid,
        )
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec.__dict__))
        os.replace(tmp, self.state_path)

    def _read_record(self) -> EnvoyRecord | None:
        try:
            return EnvoyRecord(**json.loads(self.state_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _is_our_envoy(self, rec: EnvoyRecord) -> bool:
        return pids.alive(rec.pid) and rec.bootstrap_path in pids.cmdline(rec.pid)

    def adopt_or_start(self) -> str:
        """At agent start: adopt the Envoy a previous agent left running, hot-restart it into the
        new bootstrap, or start one. Returns 'adopted', 'hot-restarted' or 'started'."""
        self.prepare()
        rec = self._read_record()
        if rec is not None and self._is_our_envoy(rec):
            same = rec.bootstrap_digest == self.digest and rec.admin_url == self.cfg.admin_url
            if same and self.admin.server_info() is None:
                log.warning("the running envoy (pid %d) does not answer on its admin API: replacing it", rec.pid)
            elif same or (rec.predecessor_pid and pids.alive(rec.predecessor_pid)):
                self._adopt(rec)
                if not same:
                    self.hot_restart_pending = True
                    log.warning(
                        "the running envoy (pid %d) has another bootstrap, and the one it replaced (pid %d) is "
                        "still finishing its requests: hot restart once it has exited (at most %.0fs)",
                        rec.pid,
                        rec.predecessor_pid,
                        self.cfg.drain_deadline_s,
                    )
                return "adopted"
            elif self._hot_restart(rec):
                return "hot-restarted"
            else:
                log.warning(
                    "a running envoy (pid %d) has another bootstrap: replacing it (drain, stop, start)", rec.pid
                )
            self._terminate(rec.pid, EnvoyAdmin(rec.admin_url))
        self._spawn()
        return "started"

    def _adopt(self, rec: EnvoyRecord) -> None:
        self.pid, self.epoch, self.adopted, self.started_at = rec.pid, rec.restart_epoch, True, self.clock()
        self.proc, self.keeper_pid = None, rec.keeper_pid
        self.predecessor = rec.predecessor_pid if rec.predecessor_pid and pids.alive(rec.predecessor_pid) else None
        log.info("adopted the running envoy (pid %d) left by a previous agent", rec.pid)
        self._watch_exit()

    def _watch_exit(self) -> None:
        if self.on_exit is not None and self.pid is not None:
            restarts.on_exit(self.pid, self.on_exit, "envoy")

    def _hot_restart(self, rec: EnvoyRecord) -> bool:
        """Start the next epoch beside the running Envoy; False if that Envoy cannot hot restart."""
        base_id = _read_base_id(rec.base_id_path)
        if base_id is None:
            return False
        log.warning(
            "the running envoy (pid %d) has another bootstrap: hot restart (it finishes its requests, up to %.0fs)",
            rec.pid,
            self.cfg.drain_deadline_s,
        )
        self.predecessor, self.hot_restart_pending = rec.pid, False
        self._spawn(rec.restart_epoch + 1, base_id)
        return True

    # --- supervision --------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.pid is not None and self._running(self.pid)

    def _running(self, pid: int) -> bool:
        """Whether this Envoy runs (its keeper exits with it: reaped here, whoever started it)."""
        if self.proc is not None and pid == self.pid:
            return self.proc.poll() is None and pids.alive(pid)  # Envoy first: its keeper follows
        if pid == self.pid and self.keeper_pid:
            pids.alive(self.keeper_pid)  # reaps the keeper of an adopted Envoy that has exited
        return pids.alive(pid)

    def ensure(self) -> str:
        """One supervision step: 'running', 'restarting in Ns', 'restarted'."""
        now = self.clock()
        if self.alive():
            if self.started_at is not None:
                self.backoff.ran_for(now - self.started_at)
            self._follow_predecessor()
            return "running"
        if self._stopping:
            return "stopped"
        if self.predecessor is not None and pids.alive(self.predecessor):
            # the hot restart failed (e.g. an Envoy upgrade whose hot-restart version differs):
            # the predecessor still serves; replace it the slow way
            log.error(
                "the hot-restarted envoy (pid %s) exited; replacing envoy pid %d the slow way (drain, stop, start). "
                "Last log lines:\n%s",
                self.pid,
                self.predecessor,
                self.log_tail(),
            )
            self._terminate(self.predecessor, self.admin)
            self.predecessor = None
            self._spawn()
            return "restarted"
        if self.next_start_at is None:
            self.last_exit = restarts.describe_exit(self._keeper_exit())
            delay = self.backoff.next_delay()
            log.error(
                "envoy (pid %s) died (%s); %s. Last log lines:\n%s",
                self.pid,
                self.last_exit,
                f"restarting in {delay:.1f}s" if delay else "restarting now",
                self.log_tail(),
            )
            self.next_start_at = now + delay
        if now < self.next_start_at:
            return f"restarting in {self.next_start_at - now:.1f}s"
        self.next_start_at = None
        self.prepare()
        self._spawn()
        if self.on_restart:
            self.on_restart()
        return "restarted"

    def _keeper_exit(self) -> int | None:
        """Envoy's exit as its keeper reports it (the keeper exits right after Envoy, by its signal)."""
        if self.proc is None:
            return None  # adopted: not our child
        try:
            return self.proc.wait(KEEPER_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            return None

    def _follow_predecessor(self) -> None:
        """Notice when the Envoy a hot restart replaced has exited; then a hot restart that waited
        for it runs."""
        if self.predecessor is None or pids.alive(self.predecessor):
            return
        log.info("the replaced envoy (pid %d) has exited", self.predecessor)
        self.predecessor = None
        if self.hot_restart_pending:
            rec = self._read_record()
            if rec is not None and rec.pid == self.pid:
                self.prepare()
                if not self._hot_restart(rec):
                    self.hot_restart_pending = False

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "  (no envoy log)"
        return "\n".join(f"  {line}" for line in lines[-LOG_TAIL_LINES:]) or "  (empty envoy log)"

    # --- stop -----------------------------------------------------------------------------------

    def stop(self, drain_s: float | None = None) -> None:
        """Drain (stop taking connections, let in-flight requests finish up to the drain deadline),
        then stop — and a hot restart's predecessor, once it has finished or at the same deadline."""
        self._stopping = True
        deadline = self.clock() + (self.cfg.drain_deadline_s if drain_s is None else drain_s)
        if self.pid is not None and self.alive():
            self._terminate(self.pid, self.admin, drain_s, then=self._await_predecessor(deadline))
        if self.predecessor is not None and pids.alive(self.predecessor):
            self._terminate(self.predecessor, self.admin, 0)
        try:
            self.state_path.unlink()
        except FileNotFoundError:
            pass  # never started, or already cleaned up
        self.admin.close()

    def _await_predecessor(self, deadline: float) -> Callable[[], None]:
        """Before the current Envoy stops: let the predecessor finish (its successor ends it at
        its own deadline; once the successor is gone nothing would)."""

        def wait() -> None:
            while self.predecessor is not None and pids.alive(self.predecessor) and self.clock() < deadline:
                time.sleep(0.1)

        return wait

    def _terminate(
        self, pid: int, admin: EnvoyAdmin, drain_s: float | None = None, then: Callable[[], None] | None = None
    ) -> None:
        drain_s = self.cfg.drain_deadline_s if drain_s is None else drain_s
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
            else:
                log.warning("envoy pid %d: drain deadline (%.0fs) reached with requests in flight", pid, drain_s)
        if then is not None:
            then()
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = self.clock() + STOP_TIMEOUT_S
        while self.clock() < deadline:
            if not self._running(pid):
                return
            time.sleep(0.05)
        log.warning("envoy pid %d ignored SIGTERM for %.0fs: killing it", pid, STOP_TIMEOUT_S)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # exited just now
        if self.proc is not None and pid == self.pid:
            self.proc.wait(5)


def _read_base_id(path: str) -> int | None:
    """The hot-restart base ID an Envoy of epoch 0 wrote (--base-id-path); None if hot restart is
    not possible (an Envoy started with it disabled, or the file is gone)."""
    if not path:
        return None
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
