"""Whether a supervised engine's model processes compute while work is in flight: the timing state
the instance carries from one /proc sample to the next (pure; the verdict only sees WorkerFacts).

"Computing" is CPU time, not vLLM's counters: vLLM counts prompt tokens only when a prefill ends, so
a 36 s cold prefill moves no counter while its Worker burns a core. A frozen (SIGSTOP) or deadlocked
model process uses none."""

from __future__ import annotations

from dataclasses import dataclass

from agent.engine.procfs import TreeSample
from agent.engine.verdict import WorkerFacts

# Above this many CPU seconds per second the model processes compute. Measured on vLLM 0.32 CPU:
# idle, the Worker polls at 0-0.02 CPU s/s; a prefill or decode keeps it at ~1.0 (a 2-core host
# loaded 6x over still gives it ~0.15).
COMPUTE_BUSY_CPU_S_PER_S = 0.05


@dataclass(frozen=True)
class WorkerWatch:
    at_s: float  # when this sample was taken
    cpu_s: float | None  # compute processes' CPU seconds so far (None: none found)
    idle_since_s: float | None = None  # work in flight and no computing since then (None: computing, or idle)
    idle_cpu_s: float = 0.0  # their CPU seconds when that idle run began
    stopped_since_s: float | None = None  # some engine process has been stopped (state T) since then
    stopped: tuple[str, ...] = ()

    def facts(self) -> WorkerFacts:
        return WorkerFacts(
            stopped=self.stopped,
            stopped_for_s=0.0 if self.stopped_since_s is None else self.at_s - self.stopped_since_s,
            compute_known=self.cpu_s is not None,
            idle_for_s=0.0 if self.idle_since_s is None else self.at_s - self.idle_since_s,
        )


def observe(prev: WorkerWatch | None, sample: TreeSample, now_s: float, work_since_s: float | None) -> WorkerWatch:
    """Fold one sample into the watch. `work_since_s`: since when requests (vLLM's running/waiting
    counts) or our canary have been in flight; None when nothing is.

    An idle run begins at the later of the previous sample and the start of the work (never before
    the work existed) and lasts while the CPU used since its beginning stays under
    COMPUTE_BUSY_CPU_S_PER_S (judged over the whole run, so the idle Worker's occasional poll tick
    does not end it); computing, nothing in flight, or new processes (a restart) end it."""
    stopped = sample.stopped
    stopped_since = None
    if stopped:
        stopped_since = prev.stopped_since_s if prev and prev.stopped_since_s is not None else now_s
    cpu = sample.compute_cpu_s
    idle_since, idle_cpu = None, 0.0
    if cpu is not None and work_since_s is not None and prev is not None and prev.cpu_s is not None:
        if prev.idle_since_s is not None:
            since, base = prev.idle_since_s, prev.idle_cpu_s
        else:
            since, base = max(prev.at_s, work_since_s), prev.cpu_s
        used = cpu - base
        if 0 <= used < COMPUTE_BUSY_CPU_S_PER_S * (now_s - since):
            idle_since, idle_cpu = since, base
    return WorkerWatch(
        at_s=now_s,
        cpu_s=cpu,
        idle_since_s=idle_since,
        idle_cpu_s=idle_cpu,
        stopped_since_s=stopped_since,
        stopped=stopped,
    )
