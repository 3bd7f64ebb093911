"""The one path from an engine instance to Consul (docs/architecture.md §2.1).

The run loop, the canary (through the run loop) and the drain all write through one Publisher per
instance, like Patroni's single lock around its member writes: every write runs on the
publisher's own single worker thread, in the order it was asked for, so a verdict can never land
after the deregistration that was asked for later. Once retired (deregistered) the publisher
writes nothing more: no late verdict, no NotRegistered re-registration of a ghost instance.

Writes happen only when something changed (publish: the registration or the verdict) or the TTL
needs refreshing (refresh, called from the instance's own TTL task, not from the probe loop,
`refresh_s` after the last write). A write that takes longer than SLOW_WRITE_S is logged: a
refresh queued behind it waits for it (one writer), which the TTL's margin over refresh_s covers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from agent.catalog.base import Catalog, CatalogError, Registration, Verdict
from agent.catalog.keeper import UNCHANGED, OwnedElsewhere, RegistrationKeeper

log = logging.getLogger(__name__)

T = TypeVar("T")

RETIRED = "deregistered"
SLOW_WRITE_S = 1.0  # a local Consul agent answers in ~5 ms; a write this slow is worth a line in the log


class Publisher:
    def __init__(
        self,
        catalog: Catalog,
        instance_id: str,
        ttl_s: float,
        on_error: Callable[[], None],
        refresh_s: float | None = None,
    ):
        self.catalog = catalog
        self.id = instance_id
        self.ttl_s = ttl_s
        self.refresh_s = ttl_s / 3 if refresh_s is None else refresh_s
        self._on_error = on_error
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"consul {instance_id}")
        self._lock = threading.Lock()  # held by the writer thread around each write and the retired flag
        self.keeper = RegistrationKeeper(catalog, instance_id, ttl_s, self.refresh_s)
        self.retired = False
        self._wanted: tuple[Registration, Verdict] | None = None  # the latest asked for
        self.refused = ""  # why the registration is refused (another agent owns the ID), "" if it is not

    async def _on_writer(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def publish(self, desired: Registration, verdict: Verdict, now: float) -> str:
        """Make Consul hold `desired` with `verdict`; idempotent, re-registers after Consul lost it."""
        if self.retired:
            return RETIRED
        self._wanted = (desired, verdict)
        return await self._on_writer(self._publish, desired, verdict, now, False)

    async def refresh(self, now: float) -> str:
        """Refresh the TTL check with the latest verdict if refresh_s passed since the last write."""
        wanted = self._wanted
        if self.retired or wanted is None:
            return UNCHANGED
        return await self._on_writer(self._publish, *wanted, now, True)

    def refresh_due_in(self, now: float) -> float:
        """Seconds until the TTL wants refreshing (0: now)."""
        return max(self.keeper.pushed_at_s + self.refresh_s - now, 0.0)

    @property
    def registered(self) -> bool:
        """Consul holds the registration, as far as the last writes tell."""
        return self.keeper.registered is not None

    @property
    def ok(self) -> bool | None:
        """The last write succeeded (None: none yet)."""
        return self.keeper.ok

    async def deregister(self) -> None:
        """Remove the instance, after every write asked for before; nothing is written afterwards."""
        self.retired = True  # no new write is queued from here on
        await self._on_writer(self._deregister)

    def close(self) -> None:
        self._writer.shutdown(wait=False)

    # --- on the writer thread -----------------------------------------------------------------------

    def _publish(self, desired: Registration, verdict: Verdict, now: float, refresh: bool) -> str:
        with self._lock:
            if self.retired:
                return RETIRED
            if refresh and self.keeper.registered is None:
                return UNCHANGED  # not registered yet: the run loop's next publish registers
            started = time.monotonic()
            try:
                action = self.keeper.keep(desired, verdict, now, refresh=refresh)
            except OwnedElsewhere as e:
                if str(e) != self.refused:  # once, not every cycle
                    log.error("%s: %s", self.id, e)
                self.refused = str(e)
                self._on_error()
                return f"refused ({e})"
            except CatalogError as e:
                self._on_error()
                return f"Consul write failed ({e})"
            finally:
                took = time.monotonic() - started
                if took > SLOW_WRITE_S:
                    log.warning(
                        "%s: a Consul write (%s) took %.1fs", self.id, "TTL refresh" if refresh else "publish", took
                    )
            if self.refused:
                log.info("%s: registered (the other agent's registration had expired)", self.id)
                self.refused = ""
            return action

    def _deregister(self) -> None:
        with self._lock:
            self.retired = True
            self.keeper.forget()
            try:
                self.catalog.deregister(self.id)
            except CatalogError as e:
                log.warning("%s: could not deregister (%s); Consul will reap it when its TTL expires", self.id, e)
