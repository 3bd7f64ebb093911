"""Facts about a process by its pid, read from /proc: its state, start time and command line, and
whether it still runs. One home for them: the local mesh, the gateway's Envoy and relay
supervisors all ask here."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path


def stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on; [] if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    # the command name (field 2) is in parentheses and may contain spaces
    return raw[raw.rfind(")") + 2 :].split()


def state(pid: int) -> str:
    """'' if no such process, else its state letter (Z = zombie, i.e. gone)."""
    f = stat_fields(pid)
    return f[0] if f else ""


def start_ticks(pid: int) -> int:
    """When it started (clock ticks since boot): with the pid, it names one process."""
    f = stat_fields(pid)
    return int(f[19]) if len(f) > 19 else -1


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Whether pid runs. A child of this process that has exited is reaped here (a supervisor that
    was re-executed adopts its children by pid, without Popen objects), so it does not linger as a
    zombie."""
    if pid <= 0:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child
    return state(pid) not in ("", "Z", "X")


def wait_exit(pid: int) -> None:
    """Block until pid has exited (any process, not only a child: a pidfd). Returns at once if it is
    gone. Where pidfds are missing (Linux < 5.3) it polls."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:
        while alive(pid):
            time.sleep(0.05)
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll(1000):
            pass
    finally:
        os.close(fd)
