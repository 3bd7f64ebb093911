"""The running mesh's state file (`.run/up.json`) and process bookkeeping shared by `up` and `down`.

`up` writes the file as soon as it starts and rewrites it (atomically) whenever something
changes: its own pid, the phase (starting, healthy, stopping), the URLs and every process of the
mesh it knows about, with each process's start time so a recycled pid is never mistaken for ours.
`down` signals the pid in it, follows the phase, and cleans up by itself if `up` is gone.

Engines added to the running mesh by `ernie-mesh add` are not `up`'s children: each has its own
record, `<run_dir>/added/engine-agent-<n>.json` (its slot, instance, ports, config, and the engine
agent's pid and start time), written by `add`, dropped by `remove`; `up` adopts them (it stops them
with its own engines), `down` and `status` read them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent import pids

STATE_VERSION = 1


@dataclass(frozen=True)
class Proc:
    """One process of the mesh: pid plus its start time (clock ticks since boot) as identity."""

    name: str
    pid: int
    start_ticks: int

    def alive(self) -> bool:
        return pids.start_ticks(self.pid) == self.start_ticks and pids.state(self.pid) not in ("Z", "X", "")


@dataclass
class UpState:
    pid: int
    start_ticks: int
    run_dir: str
    phase: str = "starting"  # starting, healthy, stopping, stopped, failed
    step: str = ""  # what is happening now (shown by `down`)
    started_at: float = field(default_factory=time.time)
    urls: dict[str, str] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    processes: list[dict[str, Any]] = field(default_factory=list)  # Proc as dicts, in start order
    version: int = STATE_VERSION

    def procs(self) -> list[Proc]:
        return [Proc(**p) for p in self.processes]

    def owner(self) -> Proc:
        return Proc("up", self.pid, self.start_ticks)


def write_state(path: Path, state: UpState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(tmp, path)


def read_state(path: Path) -> UpState | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return None
    try:
        return UpState(**data)
    except TypeError:
        return None


# --- engines added by `ernie-mesh add` ---------------------------------------------------------

ADDED_DIR = "added"
# A record without a pid yet is an `add` between claiming its slot and starting the agent (a moment);
# one older than this was left by an `add` that died there.
CLAIM_STALE_S = 60.0


@dataclass
class AddedEngine:
    name: str  # its process name in the mesh's bookkeeping: engine-agent-<slot + 1>
    slot: int  # 0-based, like `up`'s engines: ports and config follow it
    instance_id: str
    engine_kind: str
    model: str  # the name clients send
    engine_port: int
    agent_port: int
    config: str  # its engine.toml
    placement: str = ""  # "GPU 1", "cores 0-3": how it was placed
    pid: int = 0  # the engine agent's; 0 while `add` starts it
    start_ticks: int = 0
    added_at: float = field(default_factory=time.time)

    def proc(self) -> Proc:
        return Proc(self.name, self.pid, self.start_ticks)

    def alive(self) -> bool:
        return self.pid > 0 and self.proc().alive()

    def stale(self) -> bool:
        """Nothing runs for this record any more: its agent is gone, or its `add` died before starting one."""
        if self.pid > 0:
            return not self.alive()
        return time.time() - self.added_at > CLAIM_STALE_S


def added_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ADDED_DIR


def _added_path(run_dir: str | Path, name: str) -> Path:
    return added_dir(run_dir) / f"{name}.json"


def claim_added(run_dir: str | Path, record: AddedEngine) -> bool:
    """Create `record`'s file if its slot is free (atomically: two `add`s never get one slot); a
    stale record in the slot is replaced. False when a live engine (or an `add` in progress) has it."""
    path = _added_path(run_dir, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            old = _read_added_file(path)
            if old is not None and not old.stale():
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(record), indent=2) + "\n")
        return True
    return False


def write_added(run_dir: str | Path, record: AddedEngine) -> None:
    path = _added_path(run_dir, record.name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    os.replace(tmp, path)


def _read_added_file(path: Path) -> AddedEngine | None:
    try:
        return AddedEngine(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def read_added(run_dir: str | Path) -> list[AddedEngine]:
    """Every added engine's record (stale ones included: callers ask `alive()`), by slot."""
    d = added_dir(run_dir)
    records = [r for r in (_read_added_file(p) for p in sorted(d.glob("*.json"))) if r is not None]
    return sorted(records, key=lambda r: r.slot)


def drop_added(run_dir: str | Path, name: str) -> None:
    _added_path(run_dir, name).unlink(missing_ok=True)


def drop_stale_added(run_dir: str | Path) -> None:
    for r in read_added(run_dir):
        if r.stale():
            drop_added(run_dir, r.name)


# --- /proc ------------------------------------------------------------------------------------


def proc_identity(name: str, pid: int) -> Proc:
    return Proc(name, pid, pids.start_ticks(pid))


def children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = pids.stat_fields(int(entry))
            if len(f) > 1:
                out.setdefault(int(f[1]), []).append(int(entry))
    return out


def descendants(pids: list[int]) -> list[int]:
    """Every live descendant of `pids` (not the pids themselves), wherever their session is."""
    kids = children_map()
    out, todo = [], list(pids)
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in out:
                out.append(child)
                todo.append(child)
    return out


def process_name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in cmd if w]
    return " ".join(words)[:120] or "?"


def kill(proc: Proc, sig: int = signal.SIGKILL) -> bool:
    """Signal `proc` (and its process group when it leads one) if it is still the same process."""
    if not proc.alive():
        return False
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def wait_gone(procs: list[Proc], timeout_s: float, interval_s: float = 0.1) -> list[Proc]:
    """Poll until none of `procs` is alive or the deadline passes; returns the survivors."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in procs if p.alive()]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(interval_s)
