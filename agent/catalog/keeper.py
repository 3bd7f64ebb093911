"""Keeping one registration and its TTL check in step with a verdict: the one piece of logic both
agents use for their own Consul entries (the engine agent for each instance, the gateway agent
for itself).

Writes only what is needed: register when Consul does not hold the desired registration (or we
do not know that it does), push the verdict when it changed or the last write failed, refresh it
when the TTL wants it (every ttl/3, if the caller allows), and register again when Consul lost
the instance (NotRegistered: Consul restarted). Not thread-safe: one writer calls it (the engine's
Publisher thread, the gateway's control loop)."""

from __future__ import annotations

import logging

from agent.catalog.base import Catalog, NotRegistered, Registration, Verdict

log = logging.getLogger(__name__)

UNCHANGED = "unchanged"


class RegistrationKeeper:
    def __init__(self, catalog: Catalog, instance_id: str, ttl_s: float):
        self.catalog = catalog
        self.id = instance_id
        self.ttl_s = ttl_s
        self.registered: Registration | None = None  # what Consul holds, as far as we know
        self.pushed: Verdict | None = None
        self.pushed_at_s = 0.0
        self.ok: bool | None = None  # the last write succeeded (None: none yet)

    def refresh_due(self, now: float) -> bool:
        return now - self.pushed_at_s >= self.ttl_s / 3

    def keep(self, desired: Registration, verdict: Verdict, now: float, refresh: bool = True) -> str:
        """Make Consul hold `desired` with `verdict`; returns what was done. CatalogError propagates
        (the caller decides how to report it); the next call then writes again."""
        try:
            if self.registered != desired:
                self.catalog.register(desired, verdict)
                self.registered = desired
                action = "registered"
            elif verdict != self.pushed or self.ok is False or (refresh and self.refresh_due(now)):
                try:
                    self.catalog.set_verdict(self.id, verdict)
                    action = "verdict pushed"
                except NotRegistered:
                    log.warning("%s: Consul no longer knows this instance (restarted?); registering again", self.id)
                    self.catalog.register(desired, verdict)
                    action = "re-registered"
            else:
                return UNCHANGED
        except Exception:
            self.ok = False
            raise
        self.ok, self.pushed, self.pushed_at_s = True, verdict, now
        return action

    def forget(self) -> None:
        """The instance was deregistered: the next keep registers it afresh."""
        self.registered = None
        self.pushed = None
