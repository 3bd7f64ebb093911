"""What a drill needs from a serving system (ernie-mesh or the nginx baseline)."""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable

from bench.engines import EngineSettings, completed_requests, freeze, kill_worker, slow_down, speed_up, thaw
from bench.load import LoadConfig, LoadGenerator

Progress = Callable[[str], None]
SLOW_FACTOR = 10.0
# A crashed engine is started again this long after it died, by both systems: the engine agent's
# first restart backoff (restart_backoff_initial_s), and systemd's Restart=on-failure RestartSec=1
# for the baseline (a careful naive setup runs its engines under systemd).
CRASH_RESTART_S = 1.0


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

    def load_generator(self, cfg: LoadConfig) -> LoadGenerator:
        """The drill's clients (a system whose clients live elsewhere, e.g. in a network namespace of
        their own, runs them there)."""
        return LoadGenerator(cfg)

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

    def kill_worker(self, i: int) -> None:
        """An OOM kill of engine i's model process alone (see bench.engines.kill_worker)."""
        kill_worker(self.settings, self.engine_url(i), self.engine_pid(i))

    def restart_crashed(self, i: int, died_at: float) -> None:
        """Engine i died on its own at `died_at` (wall clock): bring it back as its supervisor would,
        CRASH_RESTART_S later. Returns once it was started again (not once it is ready)."""
        raise NotImplementedError

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
        """Stop a part of the control plane: consul (a -dev agent: it comes back empty), consul-freeze
        (SIGSTOP: a Consul that stops answering), gateway (the gateway agent, SIGKILL)."""
        raise NotImplementedError(f"{self.name} has no {what} to stop")

    def control_plane_start(self, what: str) -> None:
        raise NotImplementedError(f"{self.name} has no {what} to start")

    def kill_part(self, what: str) -> int:
        """SIGKILL of one process of the serving path that its supervisor restarts: envoy, relay
        (one relay process), engine-agent-<i> (engine i's agent alone). Returns the pid killed."""
        raise NotImplementedError(f"{self.name} has no {what}")

    def start_engine_agent(self, i: int) -> None:
        raise NotImplementedError(f"{self.name} has no engine agents")

    def crash_at_start(self, i: int, on: bool) -> None:
        """From now on (on) engine i fails at start, until switched off; `on` also kills it once."""
        raise NotImplementedError(f"{self.name} does not supervise its engines")

    def agent_view(self, i: int) -> dict[str, object] | None:
        """What engine i's agent says about its instance (None: no agent, or it does not answer)."""
        return None
