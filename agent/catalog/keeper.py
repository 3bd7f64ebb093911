"""Keeping one registration and its TTL check in step with a verdict: the one piece of logic both
agents use for their own Consul entries (the engine agent for each instance, the gateway agent
for itself).

Writes only what is needed: register when Consul does not hold the desired registration (or we
do not know that it does), push the verdict when it changed or the last write failed, refresh it
when the TTL wants it (refresh_s after the last write, default ttl/3, if the caller allows), and
register again when Consul lost the instance (NotRegistered: Consul restarted) or when the catalog
uses a new ACL token (`token_generation`: a rotation; the local Consul agent keeps the token each
service was registered with for its anti-entropy, so the old token must not stay behind, or
verdicts stop reaching the catalog once it is deleted). Not thread-safe:
one writer calls it (the engine's Publisher thread, the gateway's control loop).

A registration whose meta names its owner (`OWNER_META`, the engine agent's identity) is never
written over a live registration of the same ID that another owner holds: before registering an
instance it does not hold yet (the first time, and again when Consul lost it) the keeper reads
the service's instances and raises OwnedElsewhere instead. Live = anything but a TTL check Consul
expired (the owner's agent is gone): passing, warning, and critical as its agent writes it
(starting, hung, ...). The owner's own earlier registration (a restarted agent) is taken back at
once."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from agent.catalog.base import Catalog, CatalogEntry, CatalogError, CheckStatus, NotRegistered, Registration, Verdict

log = logging.getLogger(__name__)

UNCHANGED = "unchanged"
OWNER_META = "agent_id"
TTL_EXPIRED = "TTL expired"  # the head of the output Consul gives a TTL check that expired


def catalog_token_generation(catalog: Catalog) -> int:
    """The catalog's ACL token generation (ConsulCatalog re-reads its token file); 0 for catalogs
    without one."""
    return int(getattr(catalog, "token_generation", 0))


class OwnedElsewhere(CatalogError):
    """A live registration with this ID belongs to another agent: not ours to overwrite."""


def foreign_owner(entries: Iterable[CatalogEntry], instance_id: str, owner: str) -> CatalogEntry | None:
    """The live registration of `instance_id` that another owner holds, if any (any node)."""
    for e in entries:
        if e.instance_id != instance_id or e.meta.get(OWNER_META, "") == owner:
            continue
        if e.status is CheckStatus.CRITICAL and e.note.startswith(TTL_EXPIRED):
            continue  # its agent stopped refreshing it
        return e
    return None


def taken_message(instance_id: str, other: CatalogEntry) -> str:
    """One line: whose registration it is and what to do."""
    return (
        f"instance {instance_id} is registered in Consul by another engine agent "
        f"({other.meta.get(OWNER_META) or 'owner unknown'}, agent {other.meta.get('agent_url') or '?'}, "
        f"node {other.node or '?'}, {other.verdict.state.value}): refusing to take it over; stop that agent, "
        "or give this engine an address or port of its own"
    )


class RegistrationKeeper:
    def __init__(self, catalog: Catalog, instance_id: str, ttl_s: float, refresh_s: float | None = None):
        self.catalog = catalog
        self.id = instance_id
        self.ttl_s = ttl_s
        self.refresh_s = ttl_s / 3 if refresh_s is None else refresh_s  # refresh the TTL this long after a write
        self.registered: Registration | None = None  # what Consul holds, as far as we know
        self.pushed: Verdict | None = None
        self.pushed_at_s = 0.0
        self.ok: bool | None = None  # the last write succeeded (None: none yet)
        self.token_generation = 0  # the catalog's token generation the registration was written with

    def refresh_due(self, now: float) -> bool:
        return now - self.pushed_at_s >= self.refresh_s

    def keep(self, desired: Registration, verdict: Verdict, now: float, refresh: bool = True) -> str:
        """Make Consul hold `desired` with `verdict`; returns what was done. CatalogError propagates
        (the caller decides how to report it); the next call then writes again."""
        generation = catalog_token_generation(self.catalog)
        try:
            new_token = self.registered is not None and generation != self.token_generation
            if self.registered != desired or new_token:
                if self.registered is None:
                    self._claim(desired)
                action = "registered" if self.registered != desired else "registered with the new Consul token"
                self.catalog.register(desired, verdict)
                self.registered = desired
            elif verdict != self.pushed or self.ok is False or (refresh and self.refresh_due(now)):
                try:
                    self.catalog.set_verdict(self.id, verdict)
                    action = "verdict pushed"
                except NotRegistered:
                    log.warning("%s: Consul no longer knows this instance (restarted?); registering again", self.id)
                    self._claim(desired)
                    self.catalog.register(desired, verdict)
                    action = "re-registered"
            else:
                return UNCHANGED
        except Exception:
            self.ok = False
            raise
        self.ok, self.pushed, self.pushed_at_s = True, verdict, now
        self.token_generation = generation
        return action

    def _claim(self, desired: Registration) -> None:
        """Raise OwnedElsewhere if another owner holds a live registration of this ID."""
        owner = desired.meta.get(OWNER_META)
        if owner is None:
            return
        _index, entries = self.catalog.instances(desired.service)
        other = foreign_owner(entries, desired.instance_id, owner)
        if other is not None:
            raise OwnedElsewhere(taken_message(desired.instance_id, other))

    def forget(self) -> None:
        """The instance was deregistered: the next keep registers it afresh."""
        self.registered = None
        self.pushed = None
