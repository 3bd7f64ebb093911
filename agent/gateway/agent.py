"""The gateway agent: catalog watch -> snapshot -> ADS, Envoy supervision, self-registration.

Two loops:
- the watch thread hands over `WatchUpdate`s (`on_watch`); new content becomes a snapshot (pure
  build), published to the ADS server if its version is new; the watch's state (discontinuity,
  failing) is kept for the grace period and the summary — the agent never reads the watch;
- the control loop (`run`) calls `reconcile_once()` every reconcile interval: supervise Envoy,
  keep the gateway's own TTL check in Consul in step with Envoy's readiness, return a one-line
  summary (logged when it changes). It survives every error and sleeps on the stop event.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
import time
from collections.abc import Callable
from dataclasses import replace

import httpx

from agent.catalog.base import Catalog, CatalogEntry, CatalogError, CheckStatus, Registration, Verdict, VerdictState
from agent.catalog.keeper import RegistrationKeeper
from agent.gateway.config import GatewayConfig
from agent.gateway.envoy import EnvoySupervisor
from agent.gateway.metrics import GatewayMetrics
from agent.gateway.relays import RelaySupervisor
from agent.gateway.shares import Shares
from agent.gateway.speed import SpeedWeights
from agent.gateway.snapshot import (
    MODEL_CLUSTER_SEPARATOR,
    EndpointCache,
    Snapshot,
    build_snapshot,
    with_held,
    with_weights,
)
from agent.gateway.watch import WatchUpdate
from agent.gateway.xds import AdsServer
from agent.naming import GATEWAY_SERVICE

SPEED_POLL_THREADS = 1
SPEED_POLL_TIMEOUT_S = 2.0
SPEED_FETCH_THREADS = 16


def _canary_latencies(http: httpx.Client, url: str) -> dict[str, float] | str:
    """instance ID -> canary latency (ms) from an engine agent's /instances, or why not."""
    try:
        r = http.get(f"{url}/instances")
        if not r.is_success:
            return f"HTTP {r.status_code}"
        items = r.json().get("instances")
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    if not isinstance(items, list):
        return "no list of instances"
    out = {}
    for i in items:
        v = i.get("canary_latency_ms") if isinstance(i, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            out[str(i.get("id"))] = float(v)
    return out


log = logging.getLogger("agent.gateway")

REGISTRATION_ERROR_LOG_EVERY_S = 30.0


def snapshot_diff(old: Snapshot | None, new: Snapshot) -> str:
    """'+id healthy, id draining, -id' : what changed between two snapshots."""
    before = {e.instance_id: e for e in (old.endpoints if old else ())}
    after = {e.instance_id: e for e in new.endpoints}
    parts = []
    for iid in sorted(set(before) | set(after)):
        a, b = before.get(iid), after.get(iid)
        if b is None:
            parts.append(f"-{iid}")
        elif a is None:
            parts.append(f"+{iid} {b.state.value}")
        elif a.state is not b.state or (a.address, a.port) != (b.address, b.port):
            parts.append(f"{iid} {b.state.value}")
    return ", ".join(parts) or "no endpoint change"


def registration_of(cfg: GatewayConfig) -> Registration:
    _host, port = cfg.host_port("listen")
    return Registration(
        service=GATEWAY_SERVICE,
        instance_id=cfg.instance_id,
        address=cfg.advertise_address,
        port=port,
        meta={
            "gateway_name": cfg.name,
            "listen_url": cfg.listen_url,
            "metrics_url": cfg.metrics_url,
            "envoy_admin": cfg.admin_url,
            "routing": cfg.routing.mode if not cfg.routing.affinity else f"affinity:{cfg.routing.key}",
            "engine_service": cfg.consul.service,
        },
        tags=("gateway",),
        ttl_s=cfg.ttl_s,
        deregister_critical_after_s=cfg.deregister_critical_after_s,
    )


def _log_failure(fut: Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("engine speed poll failed", exc_info=fut.exception())


class GatewayAgent:
    def __init__(
        self,
        cfg: GatewayConfig,
        catalog: Catalog,
        metrics: GatewayMetrics,
        ads: AdsServer,
        envoy: EnvoySupervisor,
        relays: RelaySupervisor | None = None,
        clock: Callable[[], float] = time.monotonic,
        wake: threading.Event | None = None,
    ):
        self.cfg = cfg
        self.relays = relays
        self.catalog = catalog
        self.metrics = metrics
        self.ads = ads
        self.envoy = envoy
        self.clock = clock
        self.stop_event = threading.Event()
        # set when a supervised process exits (and on stop): the loop runs at once, not on its tick
        self.wake = wake or threading.Event()
        self.snapshot: Snapshot | None = None
        self._watch: WatchUpdate | None = None  # the watch's last update: its state, for grace and summary
        # Datacenters: the gateway's own ("" until known: cli.py asks the local agent) and the
        # others it watches (LocalitySettings), each with its last update and entries; a remote one
        # failing longer than remote_keep_s is dropped until it answers again.
        self.local_dc = ""
        self._remote_watch: dict[str, WatchUpdate] = {}
        self._remote_entries: dict[str, tuple[CatalogEntry, ...]] = {}
        self._remote_dropped: set[str] = set()
        self._local_entries: tuple[CatalogEntry, ...] = ()
        self._lock = threading.Lock()
        self._rejected_logged: set[tuple[str, str]] = set()
        self._last_entries: tuple[CatalogEntry, ...] = ()
        self._held: frozenset[str] = frozenset()
        self._endpoints = EndpointCache()  # an unchanged catalog entry keeps its Endpoint object
        self._warned_models = False  # several models with the relay off: logged once
        self._registration = registration_of(cfg)
        self.keeper = RegistrationKeeper(catalog, self._registration.instance_id, cfg.ttl_s)
        self._last_registration_error_log = 0.0
        self._shares = Shares()
        self._speeds = SpeedWeights()
        self._next_speed_poll = 0.0
        self._speed_poll: Future[None] | None = None
        self._speed_pool = ThreadPoolExecutor(max_workers=SPEED_POLL_THREADS, thread_name_prefix="speed")
        self._speed_failing: set[str] = set()  # agent URLs whose last poll failed (logged once)
        self.metrics.routing.labels(cfg.routing.mode, cfg.routing.key if cfg.routing.affinity else "-").set(1)

    # --- catalog -> snapshot -> ADS (watch thread) --------------------------------------------

    def on_watch(self, update: WatchUpdate) -> None:
        """The local datacenter's watch."""
        with self._lock:
            self._watch = update
            if update.changed:
                self._local_entries = update.entries
                if not self.local_dc:
                    self.local_dc = next((e.datacenter for e in update.entries if e.datacenter), "")
                    if self.local_dc:
                        self._endpoints = EndpointCache()  # priorities depend on it: none kept
                self._publish(self._merged(), update.seen_at)

    def remote_watcher(self, datacenter: str) -> Callable[[WatchUpdate], None]:
        """The on_update of the watch of another datacenter."""

        def on_update(update: WatchUpdate) -> None:
            with self._lock:
                self._remote_watch[datacenter] = update
                back = not update.failing and datacenter in self._remote_dropped
                if back:
                    self._remote_dropped.discard(datacenter)
                    log.info("datacenter %s answers again: its instances are back in the snapshot", datacenter)
                if update.changed:
                    self._remote_entries[datacenter] = tuple(
                        e if e.datacenter else replace(e, datacenter=datacenter) for e in update.entries
                    )
                if update.changed or back:
                    self._publish(self._merged(), update.seen_at)

        return on_update

    def _merged(self) -> tuple[CatalogEntry, ...]:
        """The local entries and those of every remote datacenter not dropped."""
        out = list(self._local_entries)
        for dc in sorted(self._remote_entries):
            # the own datacenter is watched as a remote one too when the agent could not say it at start
            if dc not in self._remote_dropped and dc != self.local_dc:
                out.extend(self._remote_entries[dc])
        self._last_entries = tuple(out)
        return self._last_entries

    def _expire_remote(self) -> None:
        """Drop the instances of a remote datacenter that has not answered for remote_keep_s."""
        keep_s = self.cfg.locality.remote_keep_s
        with self._lock:
            now = self.clock()
            expired = [
                dc
                for dc, w in self._remote_watch.items()
                if w.failing_since is not None and now - w.failing_since >= keep_s and dc not in self._remote_dropped
            ]
            for dc in expired:
                self._remote_dropped.add(dc)
                log.warning(
                    "datacenter %s has not answered for %.0fs (%s): its %d instance(s) are dropped until it answers",
                    dc,
                    now - (self._remote_watch[dc].failing_since or now),
                    self._remote_watch[dc].last_error or "no answer",
                    len(self._remote_entries.get(dc, ())),
                )
            if expired:
                self._publish(self._merged(), now)

    def datacenters_state(self) -> dict[str, str]:
        """Each remote datacenter's state for the summary: ok, failing Ns (kept), dropped."""
        now = self.clock()
        with self._lock:  # the watch threads add datacenters
            watches = sorted((dc, w) for dc, w in self._remote_watch.items() if dc != self.local_dc)
            dropped = set(self._remote_dropped)
        out = {}
        for dc, w in watches:
            if dc in dropped:
                out[dc] = "dropped"
            elif w.failing_since is not None:
                out[dc] = f"unreachable {now - w.failing_since:.0f}s (kept)"
            else:
                out[dc] = "ok"
        return out

    def _priority(self, zone: str, datacenter: str) -> int:
        return self.cfg.locality.priority(zone, datacenter, self.local_dc)

    def _in_grace(self) -> bool:
        """Shortly after the catalog may have lost state (WatchUpdate.discontinuity_at)."""
        since = self._watch.discontinuity_at if self._watch is not None else None
        return since is not None and self.clock() - since < self.cfg.catalog_reset_grace_s

    def _publish(self, entries: tuple[CatalogEntry, ...], seen_at: float) -> None:
        result = build_snapshot(entries, self.cfg.cluster, self._priority, cache=self._endpoints)
        for r in result.rejected:
            if (r.instance_id, r.reason) not in self._rejected_logged:
                self._rejected_logged.add((r.instance_id, r.reason))
                log.warning("catalog entry %s left out of the snapshot: %s", r.instance_id, r.reason)
        previous, snap = self.snapshot, with_weights(result.snapshot, self._speeds.weight)
        held: frozenset[str] = frozenset()
        if previous is not None and self._in_grace():
            # held: the local datacenter's (the grace is the local watch's; remote_keep_s is theirs)
            local = {e.instance_id for e in previous.endpoints if not e.datacenter or e.datacenter == self.local_dc}
            absent = local - {e.instance_id for e in entries}
            snap = with_held(snap, previous, frozenset(absent))
            held = snap.ids() - result.snapshot.ids()
        if held and held != self._held:
            log.warning(
                "catalog discontinuity (Consul restarted or back from an outage): keeping %d absent "
                "instance(s) up to %.0fs while they re-register: %s",
                len(held),
                self.cfg.catalog_reset_grace_s,
                ", ".join(sorted(held)),
            )
        self._held = held
        if previous is not None and previous.version == snap.version:
            return
        if len(snap.models) > 1 and not self.cfg.relay.enabled and not self._warned_models:
            self._warned_models = True
            log.warning(
                "%d models are served (%s) but [relay] is off: requests are not routed by model "
                "(only the relay reads the body); turn the relay on",
                len(snap.models),
                ", ".join(snap.models),
            )
        self.snapshot = snap
        self.ads.publish(snap, changed_at=seen_at)
        self.metrics.published(snap, previous, len(result.rejected))
        log.info(
            "snapshot %s published %.0f ms after the change was seen: %s",
            snap.summary(),
            (time.monotonic() - seen_at) * 1000,
            snapshot_diff(previous, snap),
        )

    def _release_held(self) -> None:
        """The grace period is over: what the catalog says now is the truth."""
        with self._lock:
            if self._held and not self._in_grace():
                log.info("grace period over: %d instance(s) still absent from the catalog are removed", len(self._held))
                self._publish(self._merged(), self.clock())

    # --- control loop -------------------------------------------------------------------------

    def reconcile_once(self) -> str:
        self._release_held()
        self._expire_remote()
        envoy_state = self.envoy.ensure()
        ready = envoy_state == "running" and self.envoy.admin.ready()
        self.metrics.envoy_up.set(1 if ready else 0)
        if ready:
            self._sample_shares()
        self._maybe_poll_speeds()
        relays = self.relays.ensure() if self.relays is not None and self.relays.slots else None
        if relays is not None:
            self.metrics.relays_up.set(relays)
        streams = self.ads.streams()
        self.metrics.xds_streams.set(len(streams))
        if not ready:
            verdict = Verdict(
                VerdictState.CRITICAL, f"envoy {envoy_state if envoy_state != 'running' else 'not ready'}"
            )
        elif relays == 0:
            verdict = Verdict(VerdictState.CRITICAL, "no relay process running")
        else:
            verdict = Verdict(VerdictState.PASSING)
        registration = self._keep_registered(verdict)
        snap = self.snapshot
        acked = sorted({s.acked_version[:8] or "-" for s in streams})
        watch = self._watch
        consul = (
            "consul ok"
            if watch is None or not watch.failing
            else f"consul unreachable ({watch.last_error.split(':')[-1].strip()})"
        )
        held = f" ({len(self._held)} held)" if self._held else ""
        dcs = "".join(f"; {dc} {state}" for dc, state in self.datacenters_state().items())
        relay_part = (
            f"relays {relays}/{len(self.relays.slots)}; " if relays is not None and self.relays is not None else ""
        )
        return (
            f"envoy pid {self.envoy.pid} {envoy_state}{', ready' if ready else ''}; {relay_part}"
            f"snapshot {snap.summary() if snap else 'none yet'}{held}; "
            f"xds {len(streams)} stream(s) acked {','.join(acked) or '-'}; {consul}{dcs}; registration {registration}"
        )

    def _maybe_poll_speeds(self) -> None:
        """Every speed_poll_s, in the background: read the engine agents' canary latencies."""
        r = self.cfg.routing
        now = self.clock()
        if not r.speed_weights or now < self._next_speed_poll:
            return
        if self._speed_poll is not None and not self._speed_poll.done():
            return
        self._next_speed_poll = now + r.speed_poll_s
        urls = sorted({e.meta.get("agent_url", "") for e in self._last_entries} - {""})
        if urls:
            self._speed_poll = self._speed_pool.submit(self._poll_speeds, urls)
            self._speed_poll.add_done_callback(_log_failure)

    def _poll_speeds(self, urls: list[str]) -> None:
        """Read every engine agent's canary latencies at once (each at most SPEED_POLL_TIMEOUT_S);
        an agent that fails is logged once until it answers again, its instances keep their weight."""
        with httpx.Client(timeout=SPEED_POLL_TIMEOUT_S) as http, ThreadPoolExecutor(SPEED_FETCH_THREADS) as pool:
            readings = dict(zip(urls, pool.map(lambda url: _canary_latencies(http, url), urls)))
        latencies: dict[str, float] = {}
        for url, reading in readings.items():
            if isinstance(reading, str):
                if url not in self._speed_failing:
                    log.warning("engine speed: %s: %s (its instances keep their weight)", url, reading)
                self._speed_failing.add(url)
                continue
            self._speed_failing.discard(url)
            latencies.update(reading)
        with self._lock:
            if self.stop_event.is_set():
                return
            passing = {e.instance_id for e in self._last_entries if e.status is CheckStatus.PASSING}
            changed = self._speeds.update(passing, latencies)
            self.metrics.instance_weight.set({i: self._speeds.weight(i) for i in passing})
            if changed:
                log.info("instance weights from engine speed: %s", self._speeds.weights)
                self._publish(self._last_entries, self.clock())

    def stop_background(self) -> None:
        """On stop: no more polls; one under way is abandoned (it publishes nothing)."""
        self.stop_event.set()
        self._speed_pool.shutdown(wait=False, cancel_futures=True)

    def _sample_shares(self) -> None:
        base = self.cfg.cluster
        try:
            # the engine cluster and the models' clusters (base--<model>): an instance's requests in all
            clusters = self.envoy.admin.clusters_hosts(
                lambda name: name == base or name.startswith(base + MODEL_CLUSTER_SEPARATOR)
            )
        except httpx.HTTPError:
            return  # Envoy busy or restarting: the next tick samples
        totals: dict[str, int] = {}
        for hosts in clusters.values():
            for iid, h in hosts.items():
                totals[iid] = totals.get(iid, 0) + int(h.get("rq_total", 0))
        self.metrics.instance_share.set(self._shares.add(self.clock(), totals))

    def _keep_registered(self, verdict: Verdict) -> str:
        now = self.clock()
        try:
            self.keeper.keep(self._registration, verdict, now)
        except CatalogError as e:
            if now - self._last_registration_error_log >= REGISTRATION_ERROR_LOG_EVERY_S:
                self._last_registration_error_log = now
                log.warning("cannot update the gateway's registration in Consul: %s", e)
            return "failing"
        return verdict.state.value

    def run(self) -> None:
        last = ""
        while not self.stop_event.is_set():
            self.wake.clear()  # before the step: an exit during it wakes the next one at once
            try:
                summary = self.reconcile_once()
            except Exception:  # noqa: BLE001 - the loop survives every error; it is logged
                log.exception("reconcile failed; retrying in %.1fs", self.cfg.reconcile_interval_s)
                summary = ""
            if summary and summary != last:
                log.info("%s", summary)
                last = summary
            self.wake.wait(self.cfg.reconcile_interval_s)

    def deregister(self) -> None:
        try:
            self.catalog.deregister(self._registration.instance_id)
        except CatalogError as e:
            log.warning("cannot deregister the gateway from Consul: %s", e)
