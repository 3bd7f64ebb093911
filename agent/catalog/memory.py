"""In-memory catalog for unit tests, where a Consul is not the point. Same semantics as Consul's
agent API for what the project uses: blocking reads wake on change, TTL updates of unknown checks
raise NotRegistered."""

from __future__ import annotations

import threading

from agent.catalog.base import CatalogEntry, CatalogUnavailable, CheckStatus, NotRegistered, Registration, Verdict


class MemoryCatalog:
    def __init__(self, node: str = "local"):
        self.node = node
        self.available = True
        self._regs: dict[str, Registration] = {}
        self._verdicts: dict[str, Verdict] = {}
        self._expired: set[str] = set()  # TTL checks Consul would show as expired
        self._index = 1
        self._changed = threading.Condition()
        self.writes: list[tuple[str, str]] = []  # (operation, instance_id) for assertions
        self.token_generation = 0  # what ConsulCatalog counts when its token file changes
        self.token_accessor = ""

    def _check(self) -> None:
        if not self.available:
            raise CatalogUnavailable("memory catalog switched off")

    def _bump(self) -> None:
        with self._changed:
            self._index += 1
            self._changed.notify_all()

    def register(self, reg: Registration, verdict: Verdict) -> None:
        self._check()
        self._regs[reg.instance_id] = reg
        self._verdicts[reg.instance_id] = verdict
        self._expired.discard(reg.instance_id)
        self.writes.append(("register", reg.instance_id))
        self._bump()

    def set_verdict(self, instance_id: str, verdict: Verdict) -> None:
        self._check()
        if instance_id not in self._regs:
            raise NotRegistered(f"check service:{instance_id} unknown")
        self.writes.append(("verdict", instance_id))
        self._expired.discard(instance_id)
        if self._verdicts.get(instance_id) != verdict:
            self._verdicts[instance_id] = verdict
            self._bump()

    def deregister(self, instance_id: str) -> None:
        self._check()
        self.writes.append(("deregister", instance_id))
        if self._regs.pop(instance_id, None) is not None:
            self._verdicts.pop(instance_id, None)
            self._bump()

    def forget_everything(self) -> None:
        """What a restarted Consul dev agent looks like: nothing registered."""
        self._regs.clear()
        self._verdicts.clear()
        self._bump()

    def local_instances(self, service: str) -> dict[str, Registration]:
        self._check()
        return {k: v for k, v in self._regs.items() if v.service == service}

    def verdict(self, instance_id: str) -> Verdict | None:
        return self._verdicts.get(instance_id)

    def instances(self, service: str, index: int = 0, wait_s: float = 0.0) -> tuple[int, list[CatalogEntry]]:
        self._check()
        with self._changed:
            if index and wait_s > 0 and index >= self._index:
                self._changed.wait(timeout=wait_s)
            current = self._index
        entries = [
            CatalogEntry(
                instance_id=r.instance_id,
                node=self.node,
                address=r.address,
                port=r.port,
                status=CheckStatus.CRITICAL
                if r.instance_id in self._expired
                else self._verdicts[r.instance_id].check_status,
                note="TTL expired" if r.instance_id in self._expired else self._verdicts[r.instance_id].note,
                meta=dict(r.meta),
                tags=r.tags,
            )
            for r in self._regs.values()
            if r.service == service
        ]
        return current, entries

    def expire_ttl(self, instance_id: str) -> None:
        """Test helper: the instance's agent stopped refreshing it and its TTL ran out."""
        self._expired.add(instance_id)
        self._bump()

    def set_entry_verdict(self, instance_id: str, verdict: Verdict) -> None:
        """Test helper: change a verdict as if another agent did it."""
        self._verdicts[instance_id] = verdict
        self._bump()
