"""What /proc says about a supervised engine's processes: stopped (SIGSTOP) or computing.

vLLM's API server (the pid the agent spawned) answers HTTP; the model runs in its children
(`VLLM::EngineCore` schedules, `VLLM::Worker` runs the model). Measured on vLLM 0.32 CPU
(docs/vllm-cpu.md): a cold 1,454-token prefill keeps the Worker at ~100 CPU ticks/s for 34 s while
no vLLM counter moves; idle, the Worker polls at 0-2 ticks/s and EngineCore at 0; a SIGSTOPped
process shows state 'T' and no ticks. The API server's own CPU is left out on purpose: our probes
and clients keep it busy whatever the model does.

Parsing is pure (tested against sample text); reading is `read_tree`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_SIZE_BYTES = os.sysconf("SC_PAGE_SIZE")
STOPPED_STATES = ("T", "t")  # stopped by a signal; stopped under a tracer
PROC_DIR = "/proc"


@dataclass(frozen=True)
class ProcStat:
    """One line of /proc/<pid>/stat, the fields we use."""

    pid: int
    comm: str  # the process title's first 15 bytes (vLLM sets "VLLM::Worker", "VLLM::EngineCor…")
    state: str
    ppid: int
    cpu_ticks: int  # utime + stime, in clock ticks
    rss_pages: int = 0  # resident set size, in pages

    @property
    def stopped(self) -> bool:
        return self.state in STOPPED_STATES

    def describe(self) -> str:
        return f"{self.comm} (pid {self.pid})"


@dataclass(frozen=True)
class TreeSample:
    """The engine's process tree at one instant."""

    root: ProcStat | None  # None: the spawned process is gone (or /proc unreadable)
    children: tuple[ProcStat, ...]  # all descendants: where the model runs

    @property
    def stopped(self) -> tuple[str, ...]:
        procs = ((self.root,) if self.root else ()) + self.children
        return tuple(p.describe() for p in procs if p.stopped)

    @property
    def compute_cpu_s(self) -> float | None:
        """CPU seconds used so far by the processes that run the model; None without any (a simulated
        engine, or vLLM before it spawned its engine core)."""
        if not self.children:
            return None
        return sum(p.cpu_ticks for p in self.children) / CLOCK_TICKS_PER_S

    @property
    def processes(self) -> tuple[ProcStat, ...]:
        """The spawned process (while it lives) and all its descendants."""
        return ((self.root,) if self.root else ()) + self.children

    @property
    def cpu_s(self) -> float:
        """CPU seconds used so far by every process of the engine, the API server included (what the
        engine costs its host; `compute_cpu_s` is the model's share). Restarts with the engine."""
        return sum(p.cpu_ticks for p in self.processes) / CLOCK_TICKS_PER_S

    @property
    def rss_bytes(self) -> int:
        """Resident memory of every process of the engine, summed (pages shared between them, such as
        a model mapped by two processes, count once per process: an upper bound)."""
        return sum(p.rss_pages for p in self.processes) * PAGE_SIZE_BYTES


def parse_stat(text: str) -> ProcStat | None:
    """Parse /proc/<pid>/stat. The command name sits in parentheses and may itself hold spaces and
    parentheses, so split on the last ')'. None for text that is not a stat line."""
    head, sep, tail = text.rpartition(")")
    pid_text, paren, comm = head.partition(" (")
    fields = tail.split()
    if not sep or not paren or len(fields) < 13:
        return None
    try:
        # after the name: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime
        # cutime cstime priority nice num_threads itrealvalue starttime vsize rss
        return ProcStat(
            pid=int(pid_text),
            comm=comm,
            state=fields[0],
            ppid=int(fields[1]),
            cpu_ticks=int(fields[11]) + int(fields[12]),
            rss_pages=int(fields[21]) if len(fields) > 21 else 0,
        )
    except ValueError:
        return None


def tree(stats: Iterable[ProcStat], root_pid: int) -> TreeSample:
    """The root and all its descendants (by ppid), from one scan of /proc."""
    by_parent: dict[int, list[ProcStat]] = {}
    root = None
    for s in stats:
        if s.pid == root_pid:
            root = s
        by_parent.setdefault(s.ppid, []).append(s)
    children: list[ProcStat] = []
    todo, seen = [root_pid], {root_pid}
    while todo:
        for child in by_parent.get(todo.pop(), []):
            if child.pid not in seen:  # pid reuse cannot make a loop, but be sure
                seen.add(child.pid)
                children.append(child)
                todo.append(child.pid)
    return TreeSample(root, tuple(sorted(children, key=lambda p: p.pid)))


def read_stats(proc_dir: str = PROC_DIR) -> list[ProcStat]:
    """Every process's stat line (processes that vanish while we read are skipped)."""
    out: list[ProcStat] = []
    try:
        names = os.listdir(proc_dir)
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"{proc_dir}/{name}/stat", encoding="utf-8", errors="replace") as f:
                s = parse_stat(f.read())
        except OSError:
            continue
        if s is not None:
            out.append(s)
    return out


def read_tree(root_pid: int, proc_dir: str = PROC_DIR) -> TreeSample:
    return tree(read_stats(proc_dir), root_pid)
