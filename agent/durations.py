"""Seconds (float, as every config holds them) written as the duration strings other programs read.

Two grammars, no string valid in both for sub-second values, so two spellings of one rounding:
- `go_duration`: Go's and Prometheus' duration ("1m", "15s", "250ms"; whole units, Prometheus takes
  no fractions), for Consul (TTLs, blocking waits) and the Prometheus config and rules;
- `proto_duration`: protobuf's JSON Duration ("1.5s", "0.025s"; seconds only), for Envoy.
Both keep millisecond precision.
"""

from __future__ import annotations


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def go_duration(seconds: float, *, min_ms: int = 0) -> str:
    """'2m' (whole minutes), '15s' (whole seconds), else '1500ms'; never below `min_ms` ms."""
    ms = max(_ms(seconds), min_ms)
    if ms and ms % 60_000 == 0:
        return f"{ms // 60_000}m"
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def proto_duration(seconds: float) -> str:
    """'1.5s', '0.025s', '60s', '0s'."""
    ms = _ms(seconds)
    return f"{ms // 1000}.{ms % 1000:03d}".rstrip("0").rstrip(".") + "s" if ms else "0s"


def positive_seconds(text: str) -> float:
    """argparse type for a duration option: a number of seconds above 0 (0 or less is refused with one
    line and exit 2, before anything starts)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} s: a number of seconds above 0")
    return value
