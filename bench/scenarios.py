"""The drills' scenarios: what happens to which engine when, the same for both systems.

Times are relative to the start of the load: the fault at FAULT_AT x duration, its end `hold_s`
later (default HOLD x duration). A scenario runs in its own thread and records FaultEvents on the
monitor; the load runs until the duration has passed and the scenario is done.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from collections.abc import Callable

from bench.monitor import FaultEvent, Monitor
from bench.system import Progress, System

FAULT_AT = 0.25
HOLD = 0.35
ROLLING_AT = 0.15
ROLLING_PAUSE_S = 1.0


class Aborted(Exception):
    """The drill was interrupted (Ctrl-C) while the scenario waited."""


@dataclass
class Timeline:
    system: System
    monitor: Monitor
    t0: float  # wall clock at load start
    duration_s: float
    hold_s: float
    stop: threading.Event
    progress: Progress
    ready_timeout_s: float

    def at(self, rel_s: float) -> float:
        """Sleep until t0 + rel_s; returns the wall time."""
        while True:
            left = self.t0 + rel_s - time.time()
            if self.stop.is_set():
                raise Aborted()
            if left <= 0:
                return time.time()
            self.stop.wait(min(left, 0.2))

    def say(self, msg: str) -> None:
        self.progress(f"[{self.system.name} +{time.time() - self.t0:5.1f}s] {msg}")

    @property
    def fault_at(self) -> float:
        return FAULT_AT * self.duration_s

    @property
    def victim(self) -> int:
        return 1 % self.system.n


def _fault_then_end(
    tl: Timeline, label: str, index: int | None, fault: Callable[[], None], end: Callable[[], None]
) -> None:
    tl.at(tl.fault_at)
    ev = tl.monitor.add(FaultEvent(label, index, time.time()))
    fault()
    tl.say(f"{label}: fault applied")
    tl.at(tl.fault_at + tl.hold_s)
    ev.t_end = time.time()
    end()
    tl.say(f"{label}: fault ended")


def kill(tl: Timeline) -> None:
    i = tl.victim
    _fault_then_end(tl, f"kill -9 engine {i}", i, lambda: tl.system.kill(i), lambda: tl.system.after_kill(i))


def hang(tl: Timeline) -> None:
    i = tl.victim
    _fault_then_end(tl, f"freeze engine {i}", i, lambda: tl.system.freeze(i), lambda: tl.system.thaw(i))


def slow(tl: Timeline) -> None:
    i = tl.victim
    _fault_then_end(tl, f"engine {i} 10x slower", i, lambda: tl.system.slow(i), lambda: tl.system.unslow(i))


def rolling(tl: Timeline) -> None:
    tl.at(ROLLING_AT * tl.duration_s)
    for i in range(tl.system.n):
        if tl.stop.is_set():
            raise Aborted()
        ev = tl.monitor.add(FaultEvent(f"restart engine {i}", i, time.time()))
        tl.system.roll_stop(i)
        tl.say(f"engine {i} stopped")
        tl.system.roll_start(i)
        ev.t_end = time.time()
        tl.system.roll_wait(i, tl.ready_timeout_s)
        tl.say(f"engine {i} back")
        tl.stop.wait(ROLLING_PAUSE_S)


def consul_restart(tl: Timeline) -> None:
    _fault_then_end(
        tl,
        "Consul stopped",
        None,
        lambda: tl.system.control_plane_stop("consul"),
        lambda: tl.system.control_plane_start("consul"),
    )


def gateway_restart(tl: Timeline) -> None:
    _fault_then_end(
        tl,
        "gateway agent killed",
        None,
        lambda: tl.system.control_plane_stop("gateway"),
        lambda: tl.system.control_plane_start("gateway"),
    )


SCENARIOS: dict[str, Callable[[Timeline], None]] = {
    "kill": kill,
    "hang": hang,
    "slow": slow,
    "rolling": rolling,
    "consul-restart": consul_restart,
    "gateway-restart": gateway_restart,
}
MESH_ONLY = frozenset({"consul-restart", "gateway-restart"})
VLLM_OK = frozenset({"kill", "hang", "rolling", "consul-restart", "gateway-restart"})
DESCRIPTIONS = {
    "kill": "kill -9 of one engine mid-load; it is started again when the fault ends",
    "hang": "one engine frozen (/health still 200: simulated fault 'hang', or SIGSTOP of vLLM's EngineCore)",
    "slow": "one engine 10x slower (simulated engine only)",
    "rolling": "every engine restarted one after another (mesh: drain via its agent; baseline: plain restart)",
    "consul-restart": "Consul stopped under load, started again (a -dev agent: it comes back empty)",
    "gateway-restart": "the gateway agent killed -9 under load (its Envoy keeps running), started again",
}
