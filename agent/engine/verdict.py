"""The health verdict: a pure function of observed facts (docs/architecture.md §2.2). Never stored, always derived."""

from __future__ import annotations

from dataclasses import dataclass

from agent.catalog.base import Verdict, VerdictCause, VerdictState

C = VerdictCause


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
    timed_out: bool = False  # the last failure was the deadline (not an answer)
    metrics_read: bool = True  # /metrics answered before and after the last failure (so the two above are facts)
    consecutive_failures: int = 0


@dataclass(frozen=True)
class WorkerFacts:
    """The engine's processes as /proc shows them (supervised engines; None for attached ones)."""

    stopped: tuple[str, ...] = ()  # processes of the engine in state T, e.g. "VLLM::Worker (pid 7)"
    stopped_for_s: float = 0.0  # since the agent first saw one stopped
    compute_known: bool = False  # the model processes (the API server's children) were found
    idle_for_s: float = 0.0  # requests or the canary in flight, but the model processes have not computed


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
    health_failures: int = 0  # consecutive failed /health probes, the latest included
    worker: WorkerFacts | None = None  # None: no process facts (attached engine, /proc unreadable)


@dataclass(frozen=True)
class Policy:
    stall_after_s: float = 8.0  # no token for this long with requests in flight = stuck (without process facts)
    startup_timeout_s: float = 900.0
    canary_timeout_s: float = 3.0
    hang_after_s: float = 2.0  # a process stopped, or work in flight and no computing, this long = hung
    health_failures: int = 2  # consecutive /health failures before critical (one timeout is not a verdict)
    canary_failures_blind: int = 2  # canary failures needed when /metrics did not answer either


def decide(f: Facts, p: Policy) -> Verdict:
    """The verdict of the facts. Its reason is stable while the cause is (no ticking counters, no live
    load figures): the agent writes to Consul only when the verdict changes, and every change makes
    every gateway rebuild its snapshot. Live figures are in the agent's /instances."""
    crit = VerdictState.CRITICAL
    if f.draining:
        return Verdict(VerdictState.DRAINING, "drain requested", C.DRAINING)
    proc = f.process
    if proc is not None:
        if proc.crash_loop and not proc.running:  # while a retry runs, it is judged like any start
            return Verdict(
                crit,
                f"engine keeps exiting (last exit code {proc.exit_code}); retrying at the "
                f"capped backoff; see the engine log",
                C.CRASH_LOOP,
            )
        if not proc.running:
            if not proc.ever_started and not proc.stopped_on_purpose:
                return Verdict(VerdictState.STARTING, "starting the engine process", C.SPAWNING)
            if proc.stopped_on_purpose:
                return Verdict(crit, "engine stopped by the agent", C.STOPPED)
            when = "; restarting" if proc.next_restart_in_s is not None else ""
            return Verdict(crit, f"engine process exited with code {proc.exit_code}{when}", C.EXITED)
    if not f.canary.ever_succeeded:
        age = f.now_s - f.started_at_s
        if age > p.startup_timeout_s:
            why = f.health_error if f.health_ok is False else f.canary.last_error or "no successful canary"
            return Verdict(crit, f"not ready within {p.startup_timeout_s:g}s of start ({why})", C.STARTUP_TIMEOUT)
        if not f.health_ok:
            return Verdict(VerdictState.STARTING, "loading model", C.LOADING)
        if f.canary.last_ok is False:
            return Verdict(
                VerdictState.STARTING,
                f"waiting for a first canary generation ({f.canary.last_error})",
                C.CANARY_PENDING,
            )
        return Verdict(VerdictState.STARTING, "waiting for a first canary generation", C.CANARY_PENDING)
    w = f.worker
    if w is not None and w.stopped and w.stopped_for_s >= p.hang_after_s:
        return Verdict(
            crit, f"engine process {', '.join(w.stopped)} stopped (SIGSTOP) for over {p.hang_after_s:g}s", C.HUNG
        )
    if f.health_ok is False and f.health_failures >= p.health_failures:
        return Verdict(crit, f"/health failed: {f.health_error}", C.HEALTH_FAILED)
    if w is not None and w.compute_known:
        return _judge_by_compute(f, w, p)
    if f.stalled_for_s >= p.stall_after_s:
        return Verdict(crit, f"requests running but no token generated for over {p.stall_after_s:g}s", C.STUCK)
    c = f.canary
    if (v := _lone_canary_failure(f, p)) is not None:
        return v
    if c.last_ok is False:
        # Busy (e.g. a long prefill ahead of the canary): the progress watchdog above decides.
        return _passing(f, "canary missed its deadline behind other requests", C.BUSY)
    return _passing(f, "canary generation ok", C.OK)


def _judge_by_compute(f: Facts, w: WorkerFacts, p: Policy) -> Verdict:
    """With process facts, CPU time decides hung vs busy: vLLM's counters stand still during a long
    prefill (prompt tokens count when it ends), the Worker's CPU does not."""
    if w.idle_for_s >= p.hang_after_s:
        return Verdict(
            VerdictState.CRITICAL,
            f"{_work(f)} in flight but the engine's model processes have not computed for over "
            f"{p.hang_after_s:g}s, although /health answers",
            C.HUNG,
        )
    c = f.canary
    if not c.timed_out and (v := _lone_canary_failure(f, p)) is not None:  # an answer, but a bad one
        return v
    if f.stalled_for_s >= p.stall_after_s:
        return _passing(
            f, f"no token for over {p.stall_after_s:g}s but the model processes compute (long prefill)", C.BUSY
        )
    if c.last_ok is False:
        return _passing(f, "canary missed its deadline but the model processes compute", C.BUSY)
    return _passing(f, "canary generation ok", C.OK)


def _lone_canary_failure(f: Facts, p: Policy) -> Verdict | None:
    """The canary failed with nothing else in flight and no token produced meanwhile: hung, whatever
    /health says. If /metrics did not answer either, those two are unknown: wait for a second failure."""
    c = f.canary
    if c.last_ok is not False or c.progress_during_failure or c.others_in_flight:
        return None
    if c.metrics_read or c.consecutive_failures >= p.canary_failures_blind:
        return Verdict(
            VerdictState.CRITICAL,
            f"canary generation failed ({c.last_error}) and no tokens produced meanwhile, although /health answers",
            C.HUNG,
        )
    return _passing(f, f"canary failed ({c.last_error}) while /metrics did not answer; confirming", C.CONFIRMING)


def _work(f: Facts) -> str:
    if f.running is None or f.running + (f.waiting or 0) == 0:
        return "the canary"
    return "requests"


def _passing(f: Facts, reason: str, cause: VerdictCause) -> Verdict:
    if f.health_ok is False:  # one failure, not yet a verdict (Policy.health_failures)
        reason = f"{reason}; /health failed once ({f.health_error}), confirming"
    return Verdict(VerdictState.PASSING, reason, cause)
