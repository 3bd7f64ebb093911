"""Each instance's share of the requests this gateway routed over the last minute (pure): from
Envoy's per-host request counters (admin /clusters rq_total), sampled by the agent's loop. Shown
as ernie_gateway_instance_share and by `ernie-mesh status`, so that an operator sees what the
routing does (affinity keeps a conversation on one instance; the load bound spills a hot one)."""

from __future__ import annotations

from collections import deque

WINDOW_S = 60.0


class Shares:
    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    def add(self, now: float, totals: dict[str, int]) -> dict[str, float]:
        """Record the counters now; returns each present instance's share over the window (0 for an
        instance that served nothing in it; {} before two samples or without requests)."""
        self._samples.append((now, dict(totals)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        _, first = self._samples[0]
        # a counter that went down is a new Envoy (restarted): count from zero
        delta = {i: max(n - first.get(i, 0), 0) if n >= first.get(i, 0) else n for i, n in totals.items()}
        total = sum(delta.values())
        if len(self._samples) < 2 or total == 0:
            return {}
        return {i: d / total for i, d in delta.items()}
