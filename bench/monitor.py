"""Watch a system during a drill: which engines are in rotation, and whether a faulty engine
serves again; from that, seconds to detect a fault and seconds to recover from it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from bench.system import System

SAMPLE_INTERVAL_S = 0.1
DETECT_GRACE_S = 5.0  # an engine taken out this long after its fault ended still counts as detected


@dataclass
class FaultEvent:
    """One fault: `index` is the engine (None: the control plane), times are wall clock."""

    label: str
    index: int | None
    t_fault: float
    t_end: float | None = None
    detected_at: float | None = None
    recovered_at: float | None = None
    served_before: float | None = None  # the engine's completed-requests counter just after t_end
    # the scenario itself sets recovered_at (e.g. "a request through the gateway answered again")
    scenario_recovers: bool = False
    notes: dict[str, object] = field(default_factory=dict)  # what the scenario saw (reported as is)

    @property
    def detect_s(self) -> float | None:
        return None if self.detected_at is None else round(self.detected_at - self.t_fault, 2)

    @property
    def recover_s(self) -> float | None:
        if self.recovered_at is None or self.t_end is None:
            return None
        return round(max(0.0, self.recovered_at - self.t_end), 2)


class Monitor:
    def __init__(self, system: System):
        self.system = system
        self.events: list[FaultEvent] = []
        self.samples: list[tuple[float, frozenset[int]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="monitor")

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def add(self, event: FaultEvent) -> FaultEvent:
        """Watch `event` from now on. An event added after its fault (the engine a prompt of death
        took is known only once it crashed) is first judged on the samples taken since the fault."""
        with self._lock:
            for t, rot in list(self.samples):
                if t >= event.t_fault and event.detected_at is None:
                    self._detect(event, t, rot)
            self.events.append(event)
        return event

    @property
    def rotation(self) -> frozenset[int]:
        return self.samples[-1][1] if self.samples else frozenset()

    def fault_ends(self) -> list[float]:
        with self._lock:
            return [e.t_end for e in self.events if e.t_end is not None]

    def all_recovered(self) -> bool:
        with self._lock:
            return all(e.t_end is not None and e.recovered_at is not None for e in self.events)

    def _run(self) -> None:
        everyone = frozenset(range(self.system.n))
        while not self._stop.is_set():
            t = time.time()
            rot = self.system.in_rotation()
            self.samples.append((t, rot))
            with self._lock:
                events = list(self.events)
            for e in events:
                self._update(e, t, rot, everyone)
            self._stop.wait(SAMPLE_INTERVAL_S)

    @staticmethod
    def _detect(e: FaultEvent, t: float, rot: frozenset[int]) -> None:
        if e.index is not None and e.detected_at is None and e.index not in rot:
            if e.t_end is None or t <= e.t_end + DETECT_GRACE_S:
                e.detected_at = t

    def _update(self, e: FaultEvent, t: float, rot: frozenset[int], everyone: frozenset[int]) -> None:
        self._detect(e, t, rot)
        if e.t_end is None or e.recovered_at is not None or t < e.t_end or e.scenario_recovers:
            return
        if e.index is None:
            # the control plane: every engine routable again and every part answering
            if rot == everyone and self.system.control_plane_ok():
                e.recovered_at = t
            return
        if e.index not in rot:
            return
        served = self.system.completed(e.index)
        if served is None:
            return
        if e.served_before is None:
            e.served_before = served
            return
        if served > e.served_before:
            e.recovered_at = t
