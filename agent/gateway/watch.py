"""Watch one service in the catalog with blocking queries (consul-template's watch/view.go rules).

- the next query's index is the one from the reply; it resets to 0 when it goes backwards (Consul
  restarted or a snapshot restore) and is never below 1 after a reply;
- a reply is not a change: the content is compared, and only a different content is delivered
  (`same_content`: entries the reader handed back as the same objects are not compared again, so
  comparing costs the instances that changed, not the fleet);
- errors back off exponentially (capped) and the last delivered content stays in force; the
  first read after an error does not block (Consul may have come back with a lower index);
- queries are rate limited (a minimum interval between two reads);
- a change that comes within max_settle_s of the previous delivery (a burst: e.g. a rolling
  restart touching several instances) is held for a short settle window, during which a further
  change replaces it, so the rest of the burst is delivered once; a change after a quiet spell is
  delivered at once: every settle read is a whole-service answer from Consul (O(fleet): at 2,000
  instances it is most of the time a change takes to reach Envoy, docs/benchmarks.md ## Scale);
- a blocking query still parked when the Consul leader changes is abandoned for a fresh read: the
  local agent may have sent it to a server that was cut off the network, where it waits (no answer,
  no error) until the agent's connection to that server times out (~25 s after the cut, the
  consul-leader-cut drill). The leader is asked every `leader_check_s` while a query is parked.

`CatalogWatch.run()` is the thread body; `on_update(WatchUpdate)` is called from it: with
`changed` true when new content is delivered (`seen_at`: the monotonic time the first reply
carrying it came back), with `changed` false when only the watch's state moved (failing, back,
a discontinuity). The consumer needs nothing else from the watch: wiring runs one way.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol
from collections.abc import Callable, Sequence

from agent.catalog.base import CatalogEntry, CatalogError

log = logging.getLogger(__name__)

ERROR_LOG_EVERY_S = 30.0
STOP_POLL_S = 0.2  # a parked query's wait looks at the stop event this often


class Reader(Protocol):
    def instances(self, service: str, index: int = 0, wait_s: float = 0.0) -> tuple[int, list[CatalogEntry]]: ...


class LeaderReader(Reader, Protocol):
    def leader(self) -> str: ...


class WatchMetrics(Protocol):
    def watch_error(self) -> None: ...
    def watch_success(self, unix_time: float) -> None: ...


@dataclass(frozen=True)
class WatchSettings:
    wait_s: float = 60.0
    settle_s: float = 0.025
    min_interval_s: float = 0.05
    backoff_initial_s: float = 0.25
    backoff_max_s: float = 5.0
    max_settle_s: float = 0.25  # a constant churn is still delivered at least this often
    # while a blocking query is parked, ask the leader this often; a new one: read afresh (0: never)
    leader_check_s: float = 2.0


@dataclass(frozen=True)
class WatchUpdate:
    """What the watch hands its consumer: the catalog content in force and the watch's state."""

    entries: tuple[CatalogEntry, ...]
    seen_at: float  # monotonic: when the reply carrying `entries` came back
    changed: bool = True  # False: the last delivered entries, only the state moved
    # When the catalog may have lost state: the index went backwards, or the first success after
    # an outage. The consumer holds absent instances for a grace period after it.
    discontinuity_at: float | None = None
    failing_since: float | None = None  # monotonic; None while the watch succeeds
    last_error: str = ""

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def state(self) -> tuple[float | None, float | None, str]:
        return self.discontinuity_at, self.failing_since, self.last_error


def next_index(previous: int, replied: int) -> int:
    """Index rules: reset to 0 if the index went backwards; otherwise the reply's, at least 1."""
    if replied < previous:
        return 0
    return max(replied, 1)


# One entry's part of a ContentKey: id, node, address, port, status, note, sorted meta, tags.
EntryKey = tuple[str, str, str, int, str, str, tuple[tuple[str, str], ...], tuple[str, ...]]
ContentKey = tuple[EntryKey, ...]


def content_key(entries: list[CatalogEntry]) -> ContentKey:
    """What counts as a change: everything a snapshot is built from, in a stable order."""
    return tuple(
        sorted(
            (e.instance_id, e.node, e.address, e.port, e.status.value, e.note, tuple(sorted(e.meta.items())), e.tags)
            for e in entries
        )
    )


def same_content(before: Sequence[CatalogEntry], after: Sequence[CatalogEntry]) -> bool:
    """content_key(before) == content_key(after), comparing only the entries that are not the very
    same objects in both (ConsulCatalog hands back an unchanged instance as the same CatalogEntry):
    a scan of object identities plus the changed entries' keys."""
    if before is after:
        return True
    if len(before) != len(after):
        return False
    if all(a is b for a, b in zip(before, after)):
        return True
    old = {id(e): e for e in before}
    new = {id(e): e for e in after}
    if len(old) != len(before) or len(new) != len(after):  # one object twice: compare everything
        return content_key(list(before)) == content_key(list(after))
    gone = [e for i, e in old.items() if i not in new]
    came = [e for i, e in new.items() if i not in old]
    return content_key(gone) == content_key(came)


class CatalogWatch:
    def __init__(
        self,
        catalog: Reader,
        service: str,
        on_update: Callable[[WatchUpdate], None],
        settings: WatchSettings = WatchSettings(),
        metrics: WatchMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.catalog = catalog
        self.service = service
        self.on_update = on_update
        self.s = settings
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self.stop_event = threading.Event()
        self.index = 0
        self.last_entries: tuple[CatalogEntry, ...] | None = None  # the content last delivered
        self.delivered_at: float | None = None  # monotonic: when it was
        self.last_success_at: float | None = None  # monotonic
        self.failing_since: float | None = None
        self.discontinuity_at: float | None = None  # see WatchUpdate
        self.last_error = ""
        self._handed: WatchUpdate | None = None  # the last update the consumer accepted
        self.errors = 0
        self.deliveries = 0
        self.abandoned = 0  # blocking queries given up because the leader changed while they were parked
        self._leader_seen = ""  # the leader the last check saw ("" : none yet, or no leader)
        self._backoff_s = settings.backoff_initial_s
        self._last_error_log = 0.0
        self._thread: threading.Thread | None = None

    # --- thread -----------------------------------------------------------------------------------

    def start(self) -> CatalogWatch:
        self._thread = threading.Thread(target=self.run, name=f"watch-{self.service}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def healthy(self) -> bool:
        return self.failing_since is None and self.last_success_at is not None

    def run(self) -> None:
        while not self.stop_event.is_set():
            started = self.clock()
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a bug in a callback must not end the watch
                log.exception("catalog watch of %s: unexpected error; continuing", self.service)
                self.stop_event.wait(self._backoff_s)
                continue
            if self.failing_since is not None:
                self.stop_event.wait(self._backoff_s)
                self._backoff_s = min(self._backoff_s * 2, self.s.backoff_max_s)
            else:
                remaining = self.s.min_interval_s - (self.clock() - started)
                if remaining > 0:
                    self.stop_event.wait(remaining)

    # --- one query ----------------------------------------------------------------------------

    def _read(self, wait_s: float) -> tuple[int, list[CatalogEntry]] | None:
        # After an error, read without blocking: a Consul that restarted with a lower index would
        # otherwise hold a blocking query with our (higher) index for the whole wait.
        index = 0 if self.failing_since is not None else self.index
        try:
            got = self._parkable_read(index, wait_s) if index else None
            if got is None:  # not blocking (the first read, or after an error), or abandoned: read at once
                got = self.catalog.instances(self.service, 0, 0.0)
            replied, entries = got
        except CatalogError as e:
            self._failed(e)
            return None
        if replied < self.index:
            self.discontinuity_at = self.clock()
            log.warning(
                "catalog watch of %s: index went backwards (%d -> %d): Consul restarted or restored; starting over",
                self.service,
                self.index,
                replied,
            )
        self._succeeded()
        self.index = next_index(self.index, replied)
        return replied, entries

    def _parkable_read(self, index: int, wait_s: float) -> tuple[int, list[CatalogEntry]] | None:
        """A blocking read that is given up (None) if the leader changes while it is parked."""
        check_s = self.s.leader_check_s
        if check_s <= 0 or wait_s <= check_s or not hasattr(self.catalog, "leader"):
            return self.catalog.instances(self.service, index, wait_s)
        result: list[tuple[int, list[CatalogEntry]]] = []
        error: list[BaseException] = []
        done = threading.Event()

        def query() -> None:
            try:
                result.append(self.catalog.instances(self.service, index, wait_s))
            except BaseException as e:  # noqa: BLE001 - handed to the watch thread
                error.append(e)
            finally:
                done.set()

        threading.Thread(target=query, name=f"watch-{self.service}-query", daemon=True).start()
        before = self._leader_seen
        checked = self.clock()
        while not done.wait(min(check_s, STOP_POLL_S)):
            if self.stop_event.is_set():
                return None
            if self.clock() - checked < check_s:
                continue
            checked = self.clock()
            now = self._leader()
            if now and before and now != before:
                self.abandoned += 1
                log.warning(
                    "catalog watch of %s: the Consul leader changed (%s -> %s) while a blocking query was "
                    "parked; reading afresh",
                    self.service,
                    before,
                    now,
                )
                return None
            before = before or now
        if error:
            raise error[0]
        return result[0]

    def _leader(self) -> str:
        catalog: LeaderReader = self.catalog  # type: ignore[assignment]  # checked by _parkable_read
        try:
            self._leader_seen = catalog.leader() or self._leader_seen
        except CatalogError:
            pass  # the next check asks again; the query itself reports what is wrong
        return self._leader_seen

    def step(self) -> bool:
        """One blocking read (plus its settle window). True if a change was delivered."""
        got = self._read(self.s.wait_s)
        if got is None:
            self._report_state()
            return False
        _, got_entries = got
        seen_at = self.clock()
        entries = tuple(got_entries)
        if self.last_entries is not None and same_content(self.last_entries, entries):
            self._report_state()
            return False  # the index moved, the content did not (another service, a TTL refresh)
        if self.delivered_at is not None and seen_at - self.delivered_at < self.s.max_settle_s:
            entries = self._settle(entries, seen_at)  # part of a burst
        self._hand(self._update(entries, seen_at, changed=True))
        self.last_entries = entries  # only once delivered: a failed callback gets the content again
        self.delivered_at = self.clock()
        self.deliveries += 1
        return True

    def _update(self, entries: tuple[CatalogEntry, ...], seen_at: float, changed: bool) -> WatchUpdate:
        return WatchUpdate(
            entries,
            seen_at,
            changed,
            discontinuity_at=self.discontinuity_at,
            failing_since=self.failing_since,
            last_error=self.last_error,
        )

    def _hand(self, update: WatchUpdate) -> None:
        self.on_update(update)
        self._handed = update  # only once accepted: a failed callback gets it again

    def _report_state(self) -> None:
        """No new content, but the watch's state moved (failing, back, discontinuity): hand it over."""
        last = self._handed
        if last is None and self.failing_since is None and self.discontinuity_at is None:
            return  # nothing to tell yet
        update = self._update(last.entries if last else (), last.seen_at if last else self.clock(), changed=False)
        if last is None or update.state() != last.state():
            self._hand(update)

    def _settle(self, entries: tuple[CatalogEntry, ...], seen_at: float) -> tuple[CatalogEntry, ...]:
        """Hold a change for settle_s of quiet (at most max_settle_s), taking any later content."""
        if self.last_entries is None:
            return entries  # the first read is delivered at once
        deadline = seen_at + self.s.max_settle_s
        window_end = seen_at + self.s.settle_s
        while not self.stop_event.is_set():
            wait_s = min(window_end, deadline) - self.clock()
            if wait_s <= 0.001:
                break  # quiet for a whole settle window (or the burst lasted max_settle_s)
            got = self._read(wait_s)
            if got is None:
                break  # deliver what we have; the outage is handled by the main loop
            newer = tuple(got[1])
            if not same_content(entries, newer):
                entries = newer
                window_end = self.clock() + self.s.settle_s  # another change in the burst: extend
            # else: the index moved for something else (another service's check): same window
        return entries

    # --- bookkeeping --------------------------------------------------------------------------

    def _failed(self, e: CatalogError) -> None:
        now = self.clock()
        self.errors += 1
        self.last_error = str(e)
        if self.metrics:
            self.metrics.watch_error()
        if self.failing_since is None:
            self.failing_since = now
            self._last_error_log = now
            log.warning("catalog watch of %s failing: %s; keeping the last snapshot", self.service, e)
        elif now - self._last_error_log >= ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.warning(
                "catalog watch of %s still failing for %.0fs (%d errors): %s; serving the last snapshot",
                self.service,
                now - self.failing_since,
                self.errors,
                e,
            )

    def _succeeded(self) -> None:
        now = self.clock()
        if self.failing_since is not None:
            self.discontinuity_at = now
            log.info("catalog watch of %s: Consul reachable again after %.1fs", self.service, now - self.failing_since)
        self.failing_since = None
        self._backoff_s = self.s.backoff_initial_s
        self.last_success_at = now
        if self.metrics:
            self.metrics.watch_success(self.wall())
