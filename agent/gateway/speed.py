"""Load awareness from engine speed (pure): an instance much slower than the fleet gets a smaller
share of new work (its EDS load_balancing_weight; Maglev and least-request both honour it).

The signal is each engine agent's canary latency (a one-token generation every second, the same
request on every engine: agent/engine/probe.py), read from its /instances. An instance's speed is
the fleet's median latency over its own; its weight the class that speed falls in (WEIGHT_CLASSES).
A new weight applies only after HOLD consecutive readings agree, and keys move only then: weights
change rarely, not with every slow canary.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

FULL = 100
# (speed at least, weight): as fast as the median (within 30 %) -> 100; ~2x slower -> 50; ...
WEIGHT_CLASSES = ((0.7, 100), (0.4, 50), (0.2, 25), (0.0, 10))
HOLD = 3
MIN_INSTANCES = 2  # one instance has nothing to be compared with


def weight_class(speed: float) -> int:
    for at_least, weight in WEIGHT_CLASSES:
        if speed >= at_least:
            return weight
    return WEIGHT_CLASSES[-1][1]


class SpeedWeights:
    def __init__(self, hold: int = HOLD):
        self.hold = hold
        self.weights: dict[str, int] = {}
        self._pending: dict[str, tuple[int, int]] = {}  # instance -> (candidate weight, readings)

    def update(self, latencies_ms: Mapping[str, float]) -> bool:
        """One reading of every instance's canary latency; True if a weight changed."""
        known = {i: v for i, v in latencies_ms.items() if v and v > 0}
        changed = False
        for gone in set(self.weights) - set(known):
            del self.weights[gone]
            changed = True
        self._pending = {i: p for i, p in self._pending.items() if i in known}
        if len(known) < MIN_INSTANCES:
            changed |= any(w != FULL for w in self.weights.values())
            self.weights = {i: FULL for i in known}
            return changed
        median = statistics.median(known.values())
        for instance, latency in known.items():
            target = weight_class(median / latency)
            current = self.weights.setdefault(instance, FULL)
            if target == current:
                self._pending.pop(instance, None)
                continue
            candidate, seen = self._pending.get(instance, (target, 0))
            seen = seen + 1 if candidate == target else 1
            if seen >= self.hold:
                self.weights[instance] = target
                self._pending.pop(instance, None)
                changed = True
            else:
                self._pending[instance] = (target, seen)
        return changed

    def weight(self, instance: str) -> int:
        return self.weights.get(instance, FULL)
