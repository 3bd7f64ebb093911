"""Load awareness from engine speed (pure): an instance much slower than the fleet gets a smaller
share of new work (its EDS load_balancing_weight; Maglev and least-request both honour it).

The signal is each engine agent's canary latency (a one-token generation every second, the same
request on every engine: agent/engine/probe.py), read from its /instances. An instance's speed is
the fleet's median latency over its own; its weight the class that speed falls in (WEIGHT_CLASSES),
with a band around each threshold (HYSTERESIS) so that a speed hovering at one does not flip. A new
weight applies only after HOLD consecutive readings agree: weights, and with them keys, move
rarely. An instance without a reading (its agent did not answer) keeps its weight.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping

FULL = 100
# (speed at least, weight): as fast as the median (within 30 %) -> 100; ~2x slower -> 50; ...
WEIGHT_CLASSES = ((0.7, 100), (0.4, 50), (0.2, 25), (0.0, 10))
HYSTERESIS = 0.1  # leaving a class takes a speed this far beyond its threshold
HOLD = 3
MIN_READINGS = 2  # one reading has nothing to be compared with


def weight_class(speed: float, current: int = FULL) -> int:
    """The weight for `speed`; a speed within HYSTERESIS of the threshold of `current`'s class
    keeps `current`."""
    for at_least, weight in WEIGHT_CLASSES:
        if speed >= at_least:
            target = weight
            break
    else:
        target = WEIGHT_CLASSES[-1][1]
    if target == current:
        return current
    bounds = dict((w, t) for t, w in WEIGHT_CLASSES)
    if target < current and speed >= bounds[current] - HYSTERESIS:
        return current  # only just below the current class: stay
    upper = next((t for t, w in reversed(WEIGHT_CLASSES) if w > current), None)
    if target > current and upper is not None and speed < upper + HYSTERESIS:
        return current  # only just above it: stay
    return target


class SpeedWeights:
    def __init__(self, hold: int = HOLD):
        self.hold = hold
        self.weights: dict[str, int] = {}
        self._pending: dict[str, tuple[int, int]] = {}  # instance -> (candidate weight, readings)

    def update(self, present: Collection[str], latencies_ms: Mapping[str, float]) -> bool:
        """One reading: the routable instances, and the canary latencies of those whose agents
        answered. True if a weight changed."""
        changed = any(self.weights.get(i, FULL) != FULL for i in set(self.weights) - set(present))
        self.weights = {i: w for i, w in self.weights.items() if i in present}
        known = {i: v for i, v in latencies_ms.items() if i in present and v > 0}
        self._pending = {i: p for i, p in self._pending.items() if i in known}
        if len(known) < MIN_READINGS:
            return changed
        median = statistics.median(known.values())
        for instance, latency in known.items():
            current = self.weights.setdefault(instance, FULL)
            target = weight_class(median / latency, current)
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
