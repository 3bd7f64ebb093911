"""What a drill needs from a serving system (ernie-mesh or the nginx baseline)."""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable

from bench.engines import EngineSettings, completed_requests, freeze, slow_down, speed_up, thaw

Progress = Callable[[str], None]
SLOW_FACTOR = 10.0


class System:
    """N engines behind one OpenAI-compatible URL. Engine indices are 0..N-1."""

    name = "?"

    def __init__(self, settings: EngineSettings, engines: int, workdir: Path, progress: Progress):
        self.settings = settings
        self.n = engines
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.progress = progress

    # --- lifecycle ----------------------------------------------------------------------------
    base_url: str = ""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def wait_all_in_rotation(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.in_rotation() == frozenset(range(self.n)):
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"{self.name}: not every engine in rotation after {timeout_s:g}s "
            f"(in rotation: {sorted(self.in_rotation())})"
        )

    # --- observation --------------------------------------------------------------------------
    def in_rotation(self) -> frozenset[int]:
        """Engines the proxy would send a new request to right now."""
        raise NotImplementedError

    def control_plane_ok(self) -> bool:
        return True

    def engine_url(self, i: int) -> str:
        raise NotImplementedError

    def engine_pid(self, i: int) -> int | None:
        raise NotImplementedError

    def completed(self, i: int) -> float | None:
        return completed_requests(self.settings, self.engine_url(i))

    def describe(self) -> str:
        return self.name

    # --- faults -------------------------------------------------------------------------------
    def kill(self, i: int) -> None:
        raise NotImplementedError

    def after_kill(self, i: int) -> None:
        """Bring a killed engine back (at the fault's end)."""
        raise NotImplementedError

    def freeze(self, i: int) -> None:
        freeze(self.settings, self.engine_url(i), self.engine_pid(i))

    def thaw(self, i: int) -> None:
        thaw(self.settings, self.engine_url(i), self.engine_pid(i))

    def slow(self, i: int) -> None:
        slow_down(self.settings, self.engine_url(i), SLOW_FACTOR)

    def unslow(self, i: int) -> None:
        speed_up(self.settings, self.engine_url(i))

    def roll_stop(self, i: int) -> None:
        """First half of a rolling restart of engine i (returns when the engine is down)."""
        raise NotImplementedError

    def roll_start(self, i: int) -> None:
        """Second half: start it again (returns at once; the drill waits for it to be back)."""
        raise NotImplementedError

    def roll_wait(self, i: int, timeout_s: float) -> None:
        """Wait until engine i, started again by roll_start, is back in service."""
        raise NotImplementedError

    def control_plane_stop(self, what: str) -> None:
        raise NotImplementedError(f"{self.name} has no {what} to restart")

    def control_plane_start(self, what: str) -> None:
        raise NotImplementedError(f"{self.name} has no {what} to restart")
