"""The health verdict: a pure function of observed facts (docs/architecture.md §2.2). Never stored, always derived."""

from __future__ import annotations

from dataclasses import dataclass

from agent.catalog.base import Verdict, VerdictState


@dataclass(frozen=True)
class ProcessFacts:
    """What the supervisor knows about a process it started (None for attached engines)."""

    running: bool
    exit_code: int | None = None
    ever_started: bool = True  # False until the supervisor has spawned it the first time
    restarts: int = 0
    crash_loop: bool = False
    next_restart_in_s: float | None = None
    stopped_on_purpose: bool = False


@dataclass(frozen=True)
class CanaryFacts:
    """The latest 1-token generation, and whether the engine generated anything meanwhile."""

    ever_succeeded: bool = False
    last_ok: bool | None = None  # None: none finished since (re)start
    last_error: str = ""
    last_latency_s: float | None = None
    progress_during_failure: bool = False  # tokens (prompt or generated) were processed while it waited
    others_in_flight: int = 0  # other requests running or waiting when it failed (it queued behind them)


@dataclass(frozen=True)
class Facts:
    now_s: float
    started_at_s: float  # when this engine (re)started, or the agent attached
    process: ProcessFacts | None
    health_ok: bool | None  # None: not probed yet
    health_error: str
    running: float | None  # vllm:num_requests_running (None if metrics unreadable)
    waiting: float | None
    stalled_for_s: float  # requests running but no token produced for this long (0 if progressing/idle)
    canary: CanaryFacts
    draining: bool = False


@dataclass(frozen=True)
class Policy:
    stall_after_s: float = 8.0
    startup_timeout_s: float = 900.0
    canary_timeout_s: float = 3.0


def _load(f: Facts) -> str:
    if f.running is None:
        return ""
    return f"; {f.running:.0f} running, {f.waiting or 0:.0f} waiting"


def decide(f: Facts, p: Policy) -> Verdict:
    crit = VerdictState.CRITICAL
    if f.draining:
        return Verdict(VerdictState.DRAINING, f"drain requested{_load(f)}")
    proc = f.process
    if proc is not None:
        if proc.crash_loop:
            return Verdict(crit, f"crash loop: exited {proc.restarts} times (last exit code {proc.exit_code}); "
                                 f"see the engine log")
        if not proc.running:
            if not proc.ever_started and not proc.stopped_on_purpose:
                return Verdict(VerdictState.STARTING, "starting the engine process")
            if proc.stopped_on_purpose:
                return Verdict(crit, "engine stopped by the agent")
            when = f"; restart in {proc.next_restart_in_s:.0f}s" if proc.next_restart_in_s is not None else ""
            return Verdict(crit, f"engine process exited with code {proc.exit_code}{when}")
    if not f.canary.ever_succeeded:
        age = f.now_s - f.started_at_s
        if age > p.startup_timeout_s:
            why = f.health_error if f.health_ok is False else f.canary.last_error or "no successful canary"
            return Verdict(crit, f"not ready {age:.0f}s after start ({why})")
        if not f.health_ok:
            return Verdict(VerdictState.STARTING, f"loading model ({age:.0f}s)")
        if f.canary.last_ok is False:
            return Verdict(VerdictState.STARTING, f"waiting for a first canary generation ({f.canary.last_error})")
        return Verdict(VerdictState.STARTING, "waiting for a first canary generation")
    if f.health_ok is False:
        return Verdict(crit, f"/health failed: {f.health_error}")
    if f.stalled_for_s >= p.stall_after_s:
        return Verdict(crit, f"stuck: {f.running or 0:.0f} requests running but no token generated for "
                             f"{f.stalled_for_s:.0f}s")
    if f.canary.last_ok is False and not f.canary.progress_during_failure and not f.canary.others_in_flight:
        # Nothing else to do and still no token: the engine is hung, whatever /health says.
        return Verdict(crit, f"hung: canary generation failed ({f.canary.last_error}) and no tokens produced "
                             f"meanwhile, although /health answers")
    if f.canary.last_ok is False:
        # Busy (e.g. a long prefill ahead of the canary): the progress watchdog above decides.
        return Verdict(VerdictState.PASSING, "busy: canary missed its deadline behind other requests")
    return Verdict(VerdictState.PASSING, "canary generation ok")
