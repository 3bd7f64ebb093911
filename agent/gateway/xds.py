"""A small ADS server (state of the world: EDS, and CDS for the models' clusters) that serves the
current Snapshot.

It knows nothing about Consul: `publish(snapshot)` is all it gets. Each connected Envoy has one
stream; a new snapshot is pushed to every stream at once. ACKs and NACKs are matched by nonce
(a reply with an old nonce is stale and ignored); a NACK is logged with Envoy's error detail and
the rejected version is not resent. What happens is reported through `XdsCallbacks` (as
go-control-plane's `Callbacks`): every response sent (`on_push`), every ACK with the time from
"change seen" to it (`on_ack`, for the push-latency histogram), every NACK (`on_nack`). The
gateway's metrics implement them; the server holds no reference to the agent.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from agent.gateway.eds import CDS_TYPE_URL, DEFAULT_OVERPROVISIONING_FACTOR, EDS_TYPE_URL, EdsEncoder, model_clusters
from agent.gateway.snapshot import Snapshot

log = logging.getLogger(__name__)

MAX_STREAMS = 16
SERVED_TYPES = (CDS_TYPE_URL, EDS_TYPE_URL)
_KIND = {CDS_TYPE_URL: "clusters", EDS_TYPE_URL: "endpoints"}
_WAKE = object()
_CLOSED = object()


class XdsCallbacks(Protocol):
    """What the server reports, from its stream threads (keep them quick; they must not raise)."""

    def on_push(self, node_id: str, version: str) -> None:
        """One response with `version` sent to `node_id`."""

    def on_ack(self, node_id: str, version: str, latency_s: float | None) -> None:
        """`node_id` accepted `version`; `latency_s` from the change seen to the ACK, None for an
        initial sync (a change seen before the stream opened is not a push)."""

    def on_nack(self, node_id: str, version: str, message: str) -> None:
        """`node_id` rejected `version` with Envoy's error message."""


class NoCallbacks:
    """XdsCallbacks that record nothing."""

    def on_push(self, node_id: str, version: str) -> None:
        pass

    def on_ack(self, node_id: str, version: str, latency_s: float | None) -> None:
        pass

    def on_nack(self, node_id: str, version: str, message: str) -> None:
        pass


@dataclass
class Subscription:
    """One resource type on one stream: what Envoy asked for, what was sent, what it accepted."""

    names: frozenset[str] = frozenset()
    subscribed: bool = False
    sent_version: str = ""
    sent_nonce: str = ""
    acked_version: str = ""
    last_nack: str = ""


@dataclass
class StreamState:
    """What one Envoy asked for and what it accepted (read by the agent for its summary). The
    top-level fields are the endpoints' (EDS); `subs` holds every type this stream asked for."""

    id: int
    peer: str
    node_id: str = ""
    opened_at: float = 0.0
    subs: dict[str, Subscription] = field(default_factory=dict)
    inbox: queue.Queue[object] = field(default_factory=queue.Queue, repr=False)

    def sub(self, type_url: str) -> Subscription:
        return self.subs.setdefault(type_url, Subscription())

    @property
    def acked_version(self) -> str:
        return self.sub(EDS_TYPE_URL).acked_version

    @property
    def last_nack(self) -> str:
        return self.sub(EDS_TYPE_URL).last_nack


@dataclass(frozen=True)
class _Resources:
    """What is served for one snapshot: the version and the resources of each type by name."""

    versions: dict[str, str]
    by_type: dict[str, dict[str, any_pb2.Any]]


# The generated servicer base (xds-protos, no type information) is Any to mypy.
class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        address: str,
        callbacks: XdsCallbacks | None = None,
        overprovisioning_factor: int = DEFAULT_OVERPROVISIONING_FACTOR,
        cluster_template: dict[str, Any] | None = None,
    ):
        """`cluster_template`: the engine cluster as the bootstrap defines it, copied for each model
        (agent/gateway/bootstrap.py cluster_template); None serves no model clusters."""
        self.address = address
        self.overprovisioning_factor = overprovisioning_factor
        self._callbacks: XdsCallbacks = callbacks if callbacks is not None else NoCallbacks()
        self._template = cluster_template
        self._template_digest = _digest(json.dumps(cluster_template, sort_keys=True, default=str))
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._resources: _Resources | None = None
        self._clusters: tuple[tuple[str, ...], dict[str, any_pb2.Any]] = ((), {})  # models -> packed clusters
        self._changed_at: dict[str, float] = {}  # version -> monotonic time the change was seen
        self._streams: dict[int, StreamState] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._server: grpc.Server | None = None
        self.port = 0
        self._encoder = EdsEncoder(overprovisioning_factor)  # each endpoint encoded once (eds.py)
        self._build_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> AdsServer:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + 2, thread_name_prefix="ads"),
            maximum_concurrent_rpcs=MAX_STREAMS,
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        self.port = server.add_insecure_port(self.address)
        if not self.port:
            raise OSError(f"cannot listen on {self.address} for xDS")
        server.start()
        self._server = server
        return self

    def stop(self, grace_s: float = 0.5) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            s.inbox.put(_CLOSED)
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 1)
            self._server = None

    # --- publishing -----------------------------------------------------------------------------

    def publish(self, snapshot: Snapshot, changed_at: float | None = None) -> bool:
        """Make `snapshot` current and push it to every Envoy. False if it was already current."""
        with self._lock:
            if self._snapshot is not None and self._snapshot.version == snapshot.version:
                return False
        with self._build_lock:  # the encoder's caches: one build at a time
            resources = self._build(snapshot)
        with self._lock:
            self._snapshot = snapshot
            self._resources = resources
            self._changed_at[snapshot.version] = time.monotonic() if changed_at is None else changed_at
            if len(self._changed_at) > 64:
                for v in list(self._changed_at)[:-32]:
                    del self._changed_at[v]
            streams = list(self._streams.values())
        for s in streams:
            s.inbox.put(_WAKE)
        return True

    def _build(self, snapshot: Snapshot) -> _Resources:
        """Every resource of a snapshot, encoded once (not per stream): the endpoints of the base
        cluster and of each model's cluster (EDS, from each endpoint's cached encoding), and the
        models' clusters (CDS; rebuilt only when the set of models changes)."""
        names = (snapshot.cluster, *snapshot.model_clusters())
        endpoints = {n: any_pb2.Any(type_url=EDS_TYPE_URL, value=self._encoder.encode(snapshot, n)) for n in names}
        self._encoder.forget(set(names))
        if self._clusters[0] != snapshot.models:
            clusters = {}
            for c in model_clusters(snapshot, self._template) if self._template is not None else []:
                packed = any_pb2.Any()
                packed.Pack(c)
                clusters[c.name] = packed
            self._clusters = (snapshot.models, clusters)
        cds_version = _digest(self._template_digest + "\0" + "\0".join(sorted(self._clusters[1])))
        return _Resources(
            versions={EDS_TYPE_URL: snapshot.version, CDS_TYPE_URL: cds_version},
            by_type={EDS_TYPE_URL: endpoints, CDS_TYPE_URL: self._clusters[1]},
        )

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def streams(self) -> list[StreamState]:
        with self._lock:
            return list(self._streams.values())

    # --- the RPC --------------------------------------------------------------------------------

    def StreamAggregatedResources(  # noqa: N802 (gRPC name)
        self, request_iterator: Iterator[discovery_pb2.DiscoveryRequest], context: grpc.ServicerContext
    ) -> Iterator[discovery_pb2.DiscoveryResponse]:
        stream = StreamState(id=next(self._ids), peer=context.peer(), opened_at=time.monotonic())
        with self._lock:
            self._streams[stream.id] = stream
        context.add_callback(lambda: stream.inbox.put(_CLOSED))
        reader = threading.Thread(
            target=self._read, args=(request_iterator, stream), daemon=True, name=f"ads-read-{stream.id}"
        )
        reader.start()
        log.info("xDS stream %d opened from %s", stream.id, stream.peer)
        try:
            while True:
                item = stream.inbox.get()
                if item is _CLOSED:
                    break
                if item is _WAKE:
                    # clusters first: Envoy then asks for the new clusters' endpoints (warming)
                    responses = [self._response_if_new(stream, t) for t in SERVED_TYPES]
                else:
                    responses = [self._handle(stream, item)]
                for response in responses:
                    if response is not None:
                        yield response
        finally:
            with self._lock:
                self._streams.pop(stream.id, None)
            log.info("xDS stream %d from %s (node %s) closed", stream.id, stream.peer, stream.node_id or "?")

    def _read(self, request_iterator: Iterator[discovery_pb2.DiscoveryRequest], stream: StreamState) -> None:
        try:
            for request in request_iterator:
                stream.inbox.put(request)
        except grpc.RpcError:
            pass  # the stream ended (Envoy went away or we are stopping)
        except Exception:  # noqa: BLE001 - a reader crash must close the stream, not hang it
            log.exception("xDS stream %d: reading requests failed", stream.id)
        finally:
            stream.inbox.put(_CLOSED)

    def _handle(
        self, stream: StreamState, req: discovery_pb2.DiscoveryRequest
    ) -> discovery_pb2.DiscoveryResponse | None:
        if req.node.id and not stream.node_id:
            stream.node_id = req.node.id
        if req.type_url not in SERVED_TYPES:
            log.warning(
                "xDS stream %d (node %s): unsupported type %s ignored (this server serves EDS and CDS)",
                stream.id,
                stream.node_id,
                req.type_url,
            )
            return None
        sub = stream.sub(req.type_url)
        eds = req.type_url == EDS_TYPE_URL
        if req.response_nonce and req.response_nonce != sub.sent_nonce:
            # Stale: it answers a response that was superseded. Its names are not taken either: the
            # request that answers the newer response carries them, and is then a resubscription.
            return None
        names = frozenset(req.resource_names)
        resubscribed = not sub.subscribed or names != sub.names
        sub.subscribed, sub.names = True, names
        if req.response_nonce:
            if req.HasField("error_detail") and (req.error_detail.code or req.error_detail.message):
                sub.last_nack = req.error_detail.message
                sub.acked_version = req.version_info  # what Envoy still holds
                log.error(
                    "xDS NACK from %s for %s version %s: %s (keeping version %s)",
                    stream.node_id,
                    _KIND[req.type_url],
                    sub.sent_version,
                    req.error_detail.message,
                    req.version_info or "none",
                )
                self._callbacks.on_nack(stream.node_id, sub.sent_version, req.error_detail.message)
                return None
            if req.version_info != sub.acked_version:
                sub.acked_version = req.version_info
                with self._lock:
                    seen = self._changed_at.get(req.version_info) if eds else None
                # Only a change seen while this Envoy was connected is a push; the initial sync
                # of a (re)connecting Envoy is not.
                latency = None if seen is None or seen < stream.opened_at else time.monotonic() - seen
                log.debug(
                    "envoy %s acked %s %s (%.1f ms after the change was seen)",
                    stream.node_id,
                    _KIND[req.type_url],
                    req.version_info,
                    (latency or 0) * 1000,
                )
                if eds:
                    self._callbacks.on_ack(stream.node_id, req.version_info, latency)
            if not resubscribed:
                return None
        elif req.version_info:
            # A reconnecting Envoy tells us what it holds (from us or a previous agent).
            sub.acked_version = req.version_info
        return self._response(stream, req.type_url, force=True)

    def _response_if_new(self, stream: StreamState, type_url: str) -> discovery_pb2.DiscoveryResponse | None:
        sub = stream.subs.get(type_url)
        return self._response(stream, type_url, force=False) if sub is not None and sub.subscribed else None

    def _response(self, stream: StreamState, type_url: str, force: bool) -> discovery_pb2.DiscoveryResponse | None:
        res = self._resources
        if res is None:
            return None  # nothing to serve yet (no catalog read): Envoy keeps what it has
        sub = stream.sub(type_url)
        version = res.versions[type_url]
        if not force and version == sub.sent_version:
            return None
        available = res.by_type[type_url]
        if type_url == EDS_TYPE_URL:
            # the endpoints of the clusters asked for (those that exist)
            resources = [available[n] for n in sorted(sub.names) if n in available]
            if sub.names and not resources:
                return None
        else:
            resources = [available[n] for n in sorted(available)]  # CDS: the whole state, even empty
        nonce = str(next(self._nonces))
        sub.sent_version, sub.sent_nonce = version, nonce
        if type_url == EDS_TYPE_URL:
            self._callbacks.on_push(stream.node_id, version)
        return discovery_pb2.DiscoveryResponse(
            version_info=version, resources=resources, type_url=type_url, nonce=nonce
        )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
