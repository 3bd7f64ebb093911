"""Fault modes of the SIMULATED engine and their validation (pure data, no I/O)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

DEFAULT_SLOW_FACTOR = 10.0
MAX_SLOW_FACTOR = 10_000.0
DEFAULT_ERROR_RATE = 0.5


class FaultMode(str, enum.Enum):
    NONE = "none"
    HANG = "hang"  # gray failure: /health 200, every generation stalls (new and in flight)
    HANG_AFTER_HEADERS = "hang_after_headers"  # new requests get headers, then nothing
    SLOW = "slow"  # per-token delay and prefill multiplied by slow_factor
    ERROR_RATE = "error_rate"  # a fraction error_rate of generations answered 500
    CRASH = "crash"  # the process exits at once (exit code 1)


FAULT_MODE_NAMES: tuple[str, ...] = tuple(m.value for m in FaultMode)


class FaultError(ValueError):
    """An invalid fault description; the message names the problem."""


@dataclass(frozen=True)
class Fault:
    mode: FaultMode = FaultMode.NONE
    slow_factor: float = DEFAULT_SLOW_FACTOR
    error_rate: float = DEFAULT_ERROR_RATE

    def __post_init__(self) -> None:
        if not (math.isfinite(self.slow_factor) and 0 < self.slow_factor <= MAX_SLOW_FACTOR):
            raise FaultError(f"slow_factor must be a number in (0, {MAX_SLOW_FACTOR:g}], got {self.slow_factor!r}")
        if not (math.isfinite(self.error_rate) and 0.0 <= self.error_rate <= 1.0):
            raise FaultError(f"error_rate must be a number in [0, 1], got {self.error_rate!r}")

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "slow_factor": self.slow_factor, "error_rate": self.error_rate}


def parse_mode(value: object) -> FaultMode:
    if not isinstance(value, str) or value not in FAULT_MODE_NAMES:
        raise FaultError(f"mode must be one of {', '.join(FAULT_MODE_NAMES)}; got {value!r}")
    return FaultMode(value)


def _number(obj: dict[str, Any], key: str, default: float) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FaultError(f"{key} must be a number, got {value!r}")
    return float(value)


def parse_fault(obj: object) -> Fault:
    """A full fault description from JSON: parameters left out take their defaults."""
    if not isinstance(obj, dict):
        raise FaultError('the body must be a JSON object like {"mode": "hang"}')
    unknown = sorted(set(obj) - {"mode", "slow_factor", "error_rate"})
    if unknown:
        raise FaultError(f"unknown field(s): {', '.join(unknown)} (allowed: mode, slow_factor, error_rate)")
    if "mode" not in obj:
        raise FaultError("missing field: mode")
    return Fault(
        mode=parse_mode(obj["mode"]),
        slow_factor=_number(obj, "slow_factor", DEFAULT_SLOW_FACTOR),
        error_rate=_number(obj, "error_rate", DEFAULT_ERROR_RATE),
    )


class ErrorDraw:
    """Deterministic error injection: exactly `rate` of the draws fail, spread evenly
    (an error-diffusion accumulator, so tests and drills see the same sequence every run)."""

    def __init__(self) -> None:
        self._credit = 0.0

    def reset(self) -> None:
        self._credit = 0.0

    def draw(self, rate: float) -> bool:
        self._credit += rate
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False
