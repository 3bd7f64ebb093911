"""Start, supervise, adopt and stop the gateway's relay processes (`ernie-mesh relay`, one per
unix socket in run_dir; Envoy's edge balances over them).

Like Envoy, each relay runs in its own session and outlives the agent: a restarted agent adopts
the relays a previous one left (pid and command digest in run_dir/relay-<i>.json), and their ADS
streams reconnect to it. A relay that dies is restarted after a short capped backoff; while it is
away Envoy sends new requests to the others (connect failure -> retry on another relay). The
streams a dying relay carried end at the client (its connection to Envoy is gone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import pids
from agent.gateway.config import GatewayConfig
from agent.gateway import restarts
from agent.gateway.envoy import SECRET_ENV
from agent.gateway.restarts import RestartBackoff

log = logging.getLogger(__name__)

RESTART_BACKOFF_INITIAL_S = 0.2
RESTART_BACKOFF_MAX_S = 5.0
STABLE_AFTER_S = 30.0
STOP_GRACE_S = 5.0


def relay_command(cfg: GatewayConfig, index: int) -> list[str]:
    r = cfg.relay
    return [
        sys.executable,
        "-m",
        "agent",
        "relay",
        "--socket",
        cfg.relay_socket(index),
        "--hop-socket",
        cfg.hop_socket,
        "--xds",
        cfg.xds,
        "--cluster",
        cfg.cluster,
        "--node-id",
        f"{cfg.name}-relay-{index}",
        "--stall-s",
        str(r.stall_s),
        "--resume-limit",
        str(r.resume_limit),
        "--resume-limit-after-crash",
        str(r.resume_limit_after_crash),
        "--resume-wait-s",
        str(r.resume_wait_s),
        "--max-body-bytes",
        str(cfg.policy.request_buffer_limit_bytes),
        "--drain-s",
        str(r.drain_s),
        "--affinity",
        cfg.routing.key if cfg.routing.affinity else "off",
        "--session-header",
        cfg.routing.session_header,
        "--prefix-chars",
        str(cfg.routing.prefix_chars),
        "--instance-concurrency",
        str(cfg.routing.instance_concurrency),
        "--queue-size",
        str(cfg.routing.queue_size),
        "--queue-timeout-s",
        str(cfg.routing.queue_timeout_s),
        "--relay-processes",
        str(cfg.relay_processes),
        *(("--keys-dir", cfg.keys_dir) if cfg.edge.keys_required else ()),
    ]


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.started_at = 0.0
        self.next_start_at: float | None = None
        self.backoff = RestartBackoff(RESTART_BACKOFF_INITIAL_S, RESTART_BACKOFF_MAX_S, STABLE_AFTER_S)


class RelaySupervisor:
    def __init__(
        self,
        cfg: GatewayConfig,
        on_restart: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self.on_restart = on_restart
        self.on_exit = on_exit  # called from a thread the moment a relay exits
        self.clock = clock
        self.run_dir = Path(cfg.run_dir)
        self.metrics_dir = Path(cfg.relay_metrics_dir)
        self.slots = [_Slot(i) for i in range(cfg.relay_processes)]
        self._stopping = False

    # --- files ----------------------------------------------------------------------------------

    def _record_path(self, i: int) -> Path:
        return self.run_dir / f"relay-{i}.json"

    def _log_path(self, i: int) -> Path:
        return self.run_dir / f"relay-{i}.log"

    def _digest(self, i: int) -> str:
        return hashlib.sha256(json.dumps(relay_command(self.cfg, i)[3:]).encode()).hexdigest()[:16]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        repo = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
        return env

    # --- start / adopt --------------------------------------------------------------------------

    def adopt_or_start(self) -> str:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        socket_dir = Path(self.cfg.socket_dir)
        socket_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(socket_dir, 0o700)  # the hop is no way around the edge for other users
        adopted = 0
        for slot in self.slots:
            rec = self._read(slot.index)
            if (
                rec
                and pids.alive(rec.get("pid", 0))
                and rec.get("digest") == self._digest(slot.index)
                and cfg_socket_in(pids.cmdline(rec["pid"]), self.cfg.relay_socket(slot.index))
            ):
                slot.pid, slot.started_at = rec["pid"], self.clock()
                self._watch_exit(slot)
                adopted += 1
            elif (
                rec
                and pids.alive(rec.get("pid", 0))
                and cfg_socket_in(pids.cmdline(rec["pid"]), self.cfg.relay_socket(slot.index))
            ):
                log.warning("relay %d (pid %d) runs another configuration: replacing it", slot.index, rec["pid"])
                self._terminate(rec["pid"], None)
        if adopted == 0:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)  # counters of a previous run
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        for slot in self.slots:
            if slot.pid is None:
                self._spawn(slot)
        return f"{adopted} adopted, {len(self.slots) - adopted} started"

    def _read(self, i: int) -> dict[str, Any] | None:
        try:
            rec: dict[str, Any] = json.loads(self._record_path(i).read_text())
            return rec
        except (OSError, ValueError):
            return None

    def _spawn(self, slot: _Slot) -> None:
        with open(self._log_path(slot.index), "ab") as logf:
            slot.proc = subprocess.Popen(
                relay_command(self.cfg, slot.index),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )
        slot.pid, slot.started_at = slot.proc.pid, self.clock()
        tmp = self._record_path(slot.index).with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": slot.pid, "digest": self._digest(slot.index)}))
        os.replace(tmp, self._record_path(slot.index))
        log.info("relay %d started: pid %d, socket %s", slot.index, slot.pid, self.cfg.relay_socket(slot.index))
        self._watch_exit(slot)

    def _watch_exit(self, slot: _Slot) -> None:
        if self.on_exit is not None and slot.pid is not None:
            restarts.on_exit(slot.pid, self.on_exit, f"relay-{slot.index}")

    # --- supervision ----------------------------------------------------------------------------

    def _slot_alive(self, slot: _Slot) -> bool:
        if slot.pid is None:
            return False
        if slot.proc is not None and slot.proc.pid == slot.pid:
            return slot.proc.poll() is None
        return pids.alive(slot.pid)

    def _listening(self, slot: _Slot) -> bool:
        """Whether the relay accepts on its socket (a started relay needs a moment to import)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            try:
                s.connect(self.cfg.relay_socket(slot.index))
            except OSError:
                return False
        return True

    def ensure(self) -> int:
        """One supervision step; returns how many relays are running and accepting."""
        now = self.clock()
        running = 0
        for slot in self.slots:
            if self._slot_alive(slot):
                running += self._listening(slot)
                slot.backoff.ran_for(now - slot.started_at)
                continue
            if self._stopping:
                continue
            if slot.next_start_at is None:
                delay = slot.backoff.next_delay()
                code = slot.proc.returncode if slot.proc is not None and slot.proc.pid == slot.pid else None
                log.error(
                    "relay %d (pid %s) died (%s); %s (log %s)",
                    slot.index,
                    slot.pid,
                    restarts.describe_exit(code),
                    f"restarting in {delay:.1f}s" if delay else "restarting now",
                    self._log_path(slot.index),
                )
                self._forget(slot.pid)
                slot.next_start_at = now + delay
            if now >= slot.next_start_at:
                slot.next_start_at = None
                self._spawn(slot)
                if self.on_restart:
                    self.on_restart()
        return running

    def _forget(self, pid: int | None) -> None:
        if pid:
            try:
                from prometheus_client import multiprocess

                # prometheus_client ships py.typed but leaves mark_process_dead unannotated.
                multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
            except (OSError, ImportError):
                pass  # its gauge files are gone already

    # --- stop -----------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping = True
        pids = [(s.pid, s.proc) for s in self.slots if s.pid is not None and self._slot_alive(s)]
        for pid, _ in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # already gone
        deadline = self.clock() + self.cfg.relay.drain_s + STOP_GRACE_S
        for pid, proc in pids:
            self._wait(pid, proc, deadline)
        for s in self.slots:
            self._record_path(s.index).unlink(missing_ok=True)

    def _terminate(self, pid: int, proc: subprocess.Popen[bytes] | None) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        self._wait(pid, proc, self.clock() + self.cfg.relay.drain_s + STOP_GRACE_S)

    def _wait(self, pid: int, proc: subprocess.Popen[bytes] | None, deadline: float) -> None:
        while self.clock() < deadline:
            if proc is not None and proc.pid == pid:
                if proc.poll() is not None:
                    return
            elif not pids.alive(pid):
                return
            time.sleep(0.05)
        log.warning("relay pid %d did not stop in time: killing it", pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # exited just now
        if proc is not None and proc.pid == pid:
            proc.wait(5)


def cfg_socket_in(cmdline: list[str], socket_path: str) -> bool:
    return socket_path in cmdline
