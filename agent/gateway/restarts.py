"""How the gateway agent restarts the processes it supervises (Envoy, the relays): at once when one
dies, so that a gateway serves again within about the process's start time; after that with a
backoff that doubles up to a cap, so that a process that cannot start does not spin; and the
backoff forgotten once a process has run for a while."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from agent import pids


class RestartBackoff:
    def __init__(self, initial_s: float, max_s: float, stable_after_s: float):
        self.initial_s, self.max_s, self.stable_after_s = initial_s, max_s, stable_after_s
        self._next_s = 0.0  # the first restart after a stable run waits for nothing

    def ran_for(self, seconds: float) -> None:
        """The process has been up this long: a later death is a new incident."""
        if seconds > self.stable_after_s:
            self._next_s = 0.0

    def next_delay(self) -> float:
        delay = self._next_s
        self._next_s = min(max(delay * 2, self.initial_s), self.max_s)
        return delay


def on_exit(pid: int, callback: Callable[[], None], name: str) -> None:
    """Call `callback` (from a daemon thread) when pid exits: the supervisor's loop wakes then,
    instead of on its next tick."""

    def watch() -> None:
        pids.wait_exit(pid)
        callback()

    threading.Thread(target=watch, name=f"exit-watch-{name}-{pid}", daemon=True).start()


def describe_exit(returncode: int | None) -> str:
    """'exit code 1', 'killed by SIGKILL' (a negative Popen returncode), 'gone' (not our child)."""
    if returncode is None:
        return "gone"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"
