"""Envoy's parent process: `python envoy_keeper.py <envoy command...>`.

Envoy with hot restart enabled asks for SIGTERM when its parent dies (measured on 1.40), so it
must not be the gateway agent's child, or a killed agent would take every stream with it. This
keeper is that parent instead: it forks Envoy, prints Envoy's pid on stdout, ignores the signals
meant for the agent and exits as Envoy does (with its exit code, or by its signal). It imports
nothing from the project: it runs with `python -I -S`.
"""

import os
import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main() -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execv(sys.argv[1], sys.argv[1:])
        finally:
            os._exit(127)
    os.write(1, f"{pid}\n".encode())
    os.close(1)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        killed_by = os.WTERMSIG(status)
        signal.signal(killed_by, signal.SIG_DFL)
        os.kill(os.getpid(), killed_by)
    os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
