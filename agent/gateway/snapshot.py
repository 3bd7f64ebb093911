"""Catalog entries -> one immutable, versioned, validated Snapshot (go-control-plane style).

A pure function: no I/O, no clock. The version is a hash of the content, so the same catalog
always gives the same version and a reply that changed nothing publishes nothing.

    check status (verdict)        endpoint
    passing  (passing)            HEALTHY
    warning  (draining)           DRAINING   no new requests; in-flight ones finish
    critical (starting/critical)  omitted

Several models: every endpoint is also in the cluster of its served model name
(`model_cluster_name`); `models` names every model some registered instance serves (critical
ones included, so that a model whose instances are all down is known, and answered 503, not
404). The gateway serves one Envoy cluster per model (CDS) besides the base cluster (all
endpoints); the relay routes a request to its model's cluster.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

from agent.catalog.base import CatalogEntry, CheckStatus

VERSION_HEX_CHARS = 16
MODEL_CLUSTER_SEPARATOR = "--"  # base cluster name, separator, model: "ernie--sim-model"
_CLUSTER_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
_MODEL_SLUG_CHARS = 48


class SnapshotError(ValueError):
    """A snapshot that breaks an invariant (never published)."""


class EndpointState(str, enum.Enum):
    HEALTHY = "healthy"
    DRAINING = "draining"


_STATE_OF_STATUS = {CheckStatus.PASSING: EndpointState.HEALTHY, CheckStatus.WARNING: EndpointState.DRAINING}


@dataclass(frozen=True)
class Endpoint:
    instance_id: str
    address: str
    port: int
    state: EndpointState
    node: str = ""
    zone: str = ""
    model: str = ""
    weight: int = 100  # its share of new work (Envoy's load_balancing_weight): agent/gateway/speed.py
    datacenter: str = ""  # its Consul datacenter
    priority: int = 0  # its Envoy priority (0 first): LocalitySettings.priority, by zone and datacenter
    max_model_len: int = 0  # from the registration's meta (0: not known); /v1/models lists it

    def problem(self) -> str:
        """Why Envoy could not use this endpoint ('' if it can)."""
        return self._problem

    @cached_property
    def digest(self) -> bytes:
        """This endpoint's part of the snapshot version (computed once per Endpoint object)."""
        doc = [self.instance_id, self.address, self.port, self.state.value, self.node, self.zone, self.model]
        doc += [self.weight, self.datacenter, self.priority, self.max_model_len]
        return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).digest()[:16]

    @cached_property
    def _problem(self) -> str:
        if not self.instance_id:
            return "empty instance id"
        if not self.address:
            return "empty address"
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            return f"address {self.address!r} is not an IP address (Envoy EDS does not resolve names)"
        if not (0 < self.port < 65536):
            return f"port {self.port} out of range"
        return ""


@dataclass(frozen=True)
class Snapshot:
    cluster: str
    endpoints: tuple[Endpoint, ...]
    version: str = field(default="")
    # Every model a registered instance serves (sorted), routable or not; the endpoints' models among them.
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.cluster:
            raise SnapshotError("snapshot without a cluster name")
        ids = [e.instance_id for e in self.endpoints]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise SnapshotError(f"duplicate endpoint ids: {', '.join(dup)}")
        addrs = [(e.address, e.port) for e in self.endpoints]
        if len(set(addrs)) != len(addrs):
            raise SnapshotError("two endpoints share one address:port")
        for e in self.endpoints:
            why = e.problem()
            if why:
                raise SnapshotError(f"endpoint {e.instance_id or '?'}: {why}")
        if any(a.instance_id > b.instance_id for a, b in zip(self.endpoints, self.endpoints[1:])):
            raise SnapshotError("endpoints must be sorted by instance id")
        served = {e.model for e in self.endpoints if e.model}
        if not served <= set(self.models):
            object.__setattr__(self, "models", tuple(sorted(served | set(self.models))))
        if list(self.models) != sorted(set(self.models)) or "" in self.models:
            raise SnapshotError("models must be sorted, unique and non-empty")
        expected = content_version(self.cluster, self.endpoints, self.models)
        if not self.version:
            object.__setattr__(self, "version", expected)
        elif self.version != expected:
            raise SnapshotError(f"version {self.version} does not match the content ({expected})")

    def count(self, state: EndpointState) -> int:
        return sum(1 for e in self.endpoints if e.state is state)

    def ids(self, state: EndpointState | None = None) -> frozenset[str]:
        return frozenset(e.instance_id for e in self.endpoints if state is None or e.state is state)

    def summary(self) -> str:
        models = f", {len(self.models)} models" if len(self.models) > 1 else ""
        return (
            f"{self.version[:8]} {self.count(EndpointState.HEALTHY)} healthy, "
            f"{self.count(EndpointState.DRAINING)} draining{models}"
        )

    def model_clusters(self) -> dict[str, str]:
        """Envoy cluster name -> model, one per known model."""
        return {model_cluster_name(self.cluster, m): m for m in self.models}

    def endpoints_of(self, cluster: str) -> tuple[Endpoint, ...]:
        """The endpoints of the base cluster (all of them) or of a model's cluster."""
        if cluster == self.cluster:
            return self.endpoints
        model = self.model_clusters().get(cluster)
        return tuple(e for e in self.endpoints if model is not None and e.model == model)


def model_cluster_name(base: str, model: str) -> str:
    """The Envoy cluster of a served model name: letters, digits, '-' and '_' only (Envoy's stat
    names split on '.'), with a digest of the name when it had to be changed (two models whose
    names differ only in such characters get two clusters)."""
    slug = _CLUSTER_SAFE.sub("_", model)[:_MODEL_SLUG_CHARS]
    if slug != model:
        slug += "-" + hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{base}{MODEL_CLUSTER_SEPARATOR}{slug}"


@dataclass(frozen=True)
class Rejected:
    instance_id: str
    reason: str


@dataclass(frozen=True)
class BuildResult:
    snapshot: Snapshot
    rejected: tuple[Rejected, ...] = ()
    omitted: int = 0  # critical instances (not routable by design)


def content_version(cluster: str, endpoints: Iterable[Endpoint], models: Iterable[str] = ()) -> str:
    """A hash of the cluster name, the known models and each endpoint's digest, in order (an
    unchanged Endpoint object keeps its digest: a new version costs the changed endpoints plus one
    pass over 16-byte digests)."""
    h = hashlib.sha256(json.dumps([cluster, list(models)]).encode())
    h.update(b"".join(e.digest for e in endpoints))
    return h.hexdigest()[:VERSION_HEX_CHARS]


# (the entry's zone, its datacenter) -> its Envoy priority
PriorityOf = Callable[[str, str], int]


def model_of(entry: CatalogEntry) -> str:
    """The name requests use for the entry's model (vLLM's served model name, else the model)."""
    meta: Mapping[str, str] = entry.meta or {}
    return meta.get("served_model_name") or meta.get("model", "")


def endpoint_of(entry: CatalogEntry, priority_of: PriorityOf | None = None) -> Endpoint | None:
    state = _STATE_OF_STATUS.get(entry.status)
    if state is None:
        return None
    meta: Mapping[str, str] = entry.meta or {}
    zone = meta.get("zone", "")
    max_len = meta.get("max_model_len", "")
    return Endpoint(
        instance_id=entry.instance_id,
        address=entry.address,
        port=entry.port,
        state=state,
        node=entry.node,
        zone=zone,
        model=model_of(entry),
        datacenter=entry.datacenter,
        priority=priority_of(zone, entry.datacenter) if priority_of is not None else 0,
        max_model_len=int(max_len) if max_len.isdigit() else 0,
    )


class EndpointCache:
    """endpoint_of, remembered per CatalogEntry object from one build to the next: the catalog reader
    hands an unchanged instance back as the same entry, so it keeps the same Endpoint (and with it
    its cached digest, validity and xDS encoding). One cache per priority_of (a gateway has one)."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[CatalogEntry, Endpoint | None]] = {}
        self._next: dict[int, tuple[CatalogEntry, Endpoint | None]] = {}

    def of(self, entry: CatalogEntry, priority_of: PriorityOf | None = None) -> Endpoint | None:
        hit = self._last.get(id(entry))
        if hit is None or hit[0] is not entry:
            hit = (entry, endpoint_of(entry, priority_of))
        self._next[id(entry)] = hit
        return hit[1]

    def done(self) -> None:
        """End of a build: what it did not ask for is forgotten."""
        self._last, self._next = self._next, {}


def build_snapshot(
    entries: Iterable[CatalogEntry],
    cluster: str,
    priority_of: PriorityOf | None = None,
    *,
    cache: EndpointCache | None = None,
) -> BuildResult:
    """Entries -> snapshot. An entry Envoy cannot use (bad address/port, a duplicate id or
    address) is rejected with a reason instead of poisoning the whole snapshot: one misregistered
    engine must not freeze the gateway for everyone else. `priority_of(zone, datacenter)` gives
    each endpoint its Envoy priority (none: all 0). With a `cache`, an entry seen in the previous
    build keeps its Endpoint object."""
    candidates: list[Endpoint] = []
    rejected: list[Rejected] = []
    omitted = 0
    of = cache.of if cache is not None else endpoint_of
    entries = list(entries)
    models = tuple(sorted({m for m in map(model_of, entries) if m}))
    for entry in sorted(entries, key=lambda e: (e.instance_id, e.node, e.address, e.port)):
        ep = of(entry, priority_of)
        if ep is None:
            omitted += 1
            continue
        why = ep.problem()
        if why:
            rejected.append(Rejected(entry.instance_id, why))
            continue
        candidates.append(ep)
    seen_ids: set[str] = set()
    seen_addrs: set[tuple[str, int]] = set()
    kept: list[Endpoint] = []
    for ep in candidates:
        if ep.instance_id in seen_ids:
            rejected.append(
                Rejected(ep.instance_id, f"duplicate id (also on another node; kept node {_node_of(kept, ep)})")
            )
            continue
        if (ep.address, ep.port) in seen_addrs:
            rejected.append(Rejected(ep.instance_id, f"{ep.address}:{ep.port} already used by another instance"))
            continue
        seen_ids.add(ep.instance_id)
        seen_addrs.add((ep.address, ep.port))
        kept.append(ep)
    if cache is not None:
        cache.done()
    return BuildResult(Snapshot(cluster, tuple(kept), models=models), tuple(rejected), omitted)


def with_weights(snapshot: Snapshot, weight: Callable[[str], int]) -> Snapshot:
    """`snapshot` with each endpoint's weight from `weight(instance_id)` (an endpoint whose weight
    is unchanged stays the same object)."""
    endpoints = tuple(
        e if e.weight == (w := weight(e.instance_id)) else replace(e, weight=w) for e in snapshot.endpoints
    )
    if all(a is b for a, b in zip(endpoints, snapshot.endpoints)):
        return snapshot
    return Snapshot(snapshot.cluster, endpoints, models=snapshot.models)


def with_held(snapshot: Snapshot, previous: Snapshot, absent_ids: frozenset[str]) -> Snapshot:
    """`snapshot` plus the endpoints of `previous` whose instances are *absent* from the catalog
    (not critical: absent), as they were. Used for a short while after the catalog lost its state
    (Consul restarted empty) so that engines are not dropped before their agents re-register.
    A held endpoint never displaces a current one (same ID or address:port)."""
    ids = snapshot.ids()
    addrs = {(e.address, e.port) for e in snapshot.endpoints}
    held = [
        e
        for e in previous.endpoints
        if e.instance_id in absent_ids and e.instance_id not in ids and (e.address, e.port) not in addrs
    ]
    if not held:
        return snapshot
    merged = sorted(snapshot.endpoints + tuple(held), key=lambda e: e.instance_id)
    return Snapshot(snapshot.cluster, tuple(merged), models=snapshot.models)


def _node_of(kept: list[Endpoint], ep: Endpoint) -> str:
    return next((k.node for k in kept if k.instance_id == ep.instance_id), "?")
