"""Every verdict change of the engines, seen as it happens: a Consul blocking query on the service,
re-issued at once after each answer (agent/catalog), in a background thread of the dashboard.

A crashed engine is critical for about a second before its agent restarts it (`starting`): a page
that polls could miss that. `VerdictWatch.recent()` keeps, per instance, its last critical
verdict (reason, when) for `keep_s`, so the dashboard shows "critical 8 s ago: engine process
exited" in red until the instance has been passing for a while.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger("agent.dashboard.incidents")

KEEP_S = 120.0
WAIT_S = 30.0
RETRY_S = 2.0


class VerdictWatch:
    def __init__(self, consul: str, service: str, keep_s: float = KEEP_S):
        self.consul = consul
        self.service = service
        self.keep_s = keep_s
        self._lock = threading.Lock()
        self._last: dict[str, dict[str, Any]] = {}  # instance -> its last critical verdict
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> VerdictWatch:
        self._thread = threading.Thread(target=self._run, name="verdict watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def observe(self, entries: list[Any], now: float | None = None) -> None:
        """Record the critical verdicts among `entries` (CatalogEntry)."""
        now = time.time() if now is None else now
        with self._lock:
            for e in entries:
                if e.verdict.state.value == "critical":
                    seen = self._last.get(e.instance_id)
                    if seen is None or seen["reason"] != e.verdict.reason or now - seen["at"] > self.keep_s:
                        self._last[e.instance_id] = {"reason": e.verdict.reason, "at": now}
                    else:
                        seen["until"] = now

    def recent(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """instance -> {"reason", "at", "ago_s"} of its last critical verdict within keep_s."""
        now = time.time() if now is None else now
        with self._lock:
            return {
                iid: {"reason": c["reason"], "at": c["at"], "ago_s": round(now - c["at"], 1)}
                for iid, c in self._last.items()
                if now - c.get("until", c["at"]) <= self.keep_s
            }

    def _run(self) -> None:
        from agent.catalog.consul import ConsulCatalog

        catalog = ConsulCatalog(self.consul, os.environ.get("CONSUL_HTTP_TOKEN"))
        index = 0
        while not self._stop.is_set():
            try:
                index, entries = catalog.instances(self.service, index, WAIT_S if index else 0.0)
            except Exception as e:  # Consul away: try again shortly (the snapshot says Consul is unreachable)
                log.debug("verdict watch: %s", e)
                index = 0
                self._stop.wait(RETRY_S)
                continue
            self.observe(entries)
