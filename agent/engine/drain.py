"""When a draining engine is drained (docs/architecture.md §2.3): nothing in flight, and no new request
for a quiet period. Pure: fed the engine's /metrics readings and the time, it decides nothing else.

A drain is only as good as the gateways' view of it: while Consul has no leader, the local agent
accepts the `draining` verdict but the gateways never see it and keep routing here. An instant with
nothing in flight (between two requests) then says nothing; a quiet period without a single new
request does. Arrivals come from vLLM's counters: every request is counted once in waiting + running
+ `vllm:request_success_total` (all finish reasons, aborts included), so that sum grows by one per
request that reached the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.engine.probe import EngineLoad


@dataclass
class DrainWatch:
    quiet_s: float
    started_s: float
    seen: float | None = None  # requests the engine has counted (finished + running + waiting)
    in_flight: float = 0.0
    arrived: int = 0  # requests that reached the engine since the first reading
    last_activity_s: float = field(init=False)  # the last arrival, or the last reading with work in flight

    def __post_init__(self) -> None:
        self.last_activity_s = self.started_s

    def observe(self, load: EngineLoad | None, now_s: float) -> None:
        """One /metrics reading (None: unreadable, which proves nothing either way)."""
        if load is None:
            return
        seen = load.requests_seen
        if self.seen is not None and seen > self.seen:
            self.arrived += round(seen - self.seen)
            self.last_activity_s = now_s
        self.seen = seen if self.seen is None else max(seen, self.seen)
        self.in_flight = load.running + load.waiting
        if self.in_flight > 0:
            self.last_activity_s = now_s

    def quiet_for(self, now_s: float) -> float:
        return now_s - self.last_activity_s

    def drained(self, now_s: float) -> bool:
        """Nothing in flight and nothing new for quiet_s (and the engine was read at least once)."""
        return self.seen is not None and self.in_flight == 0 and self.quiet_for(now_s) >= self.quiet_s
