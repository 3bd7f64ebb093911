from __future__ import annotations

import time
from typing import TypeVar
from collections.abc import Callable

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    pass


def wait_until(predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.05, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the thing polled may not be up yet; keep the last error for the message
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise WaitTimeout(f"{what} not reached within {timeout_s:g}s{detail}")
        time.sleep(interval_s)
