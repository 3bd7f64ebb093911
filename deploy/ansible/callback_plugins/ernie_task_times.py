# ernie-mesh: print the slowest tasks at the end of a run (enable with
# ANSIBLE_CALLBACKS_ENABLED=ernie_task_times; ansible-core ships no profile_tasks).
from __future__ import annotations

DOCUMENTATION = """
    name: ernie_task_times
    type: aggregate
    short_description: the slowest tasks of a run
    description: Prints the wall time of the slowest tasks (all hosts of a task together) after the recap.
    requirements: [enable in callbacks_enabled]
"""

import time

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "ernie_task_times"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._times: list[tuple[str, float]] = []
        self._current: tuple[str, float] | None = None

    def _close(self) -> None:
        if self._current:
            name, t0 = self._current
            self._times.append((name, time.monotonic() - t0))
            self._current = None

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._close()
        self._current = (task.get_name(), time.monotonic())

    def v2_playbook_on_handler_task_start(self, task):
        self.v2_playbook_on_task_start(task, False)

    def v2_playbook_on_stats(self, stats):
        self._close()
        total = sum(t for _, t in self._times)
        self._display.display(f"TASK TIMES (total {total:.1f}s, slowest first):")
        for name, t in sorted(self._times, key=lambda x: -x[1])[:25]:
            self._display.display(f"  {t:7.1f}s  {name}")
