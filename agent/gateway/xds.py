"""A small ADS server (state of the world, EDS only) that serves the current Snapshot.

It knows nothing about Consul: `publish(snapshot)` is all it gets. Each connected Envoy has one
stream; a new snapshot is pushed to every stream at once. ACKs and NACKs are matched by nonce
(a reply with an old nonce is stale and ignored); a NACK is logged with Envoy's error detail and
the rejected version is not resent. What happens is reported through `XdsCallbacks` (as
go-control-plane's `Callbacks`): every response sent (`on_push`), every ACK with the time from
"change seen" to it (`on_ack`, for the push-latency histogram), every NACK (`on_nack`). The
gateway's metrics implement them; the server holds no reference to the agent.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from agent.gateway.eds import DEFAULT_OVERPROVISIONING_FACTOR, EDS_TYPE_URL, EdsEncoder
from agent.gateway.snapshot import Snapshot

log = logging.getLogger(__name__)

MAX_STREAMS = 16
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
class StreamState:
    """What one Envoy asked for and what it accepted (read by the agent for its summary)."""

    id: int
    peer: str
    node_id: str = ""
    names: frozenset[str] = frozenset()
    subscribed: bool = False
    sent_version: str = ""
    sent_nonce: str = ""
    acked_version: str = ""
    last_nack: str = ""
    opened_at: float = 0.0
    inbox: queue.Queue[object] = field(default_factory=queue.Queue, repr=False)


# The generated servicer base (xds-protos, no type information) is Any to mypy.
class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        address: str,
        callbacks: XdsCallbacks | None = None,
        overprovisioning_factor: int = DEFAULT_OVERPROVISIONING_FACTOR,
    ):
        self.address = address
        self.overprovisioning_factor = overprovisioning_factor
        self._callbacks: XdsCallbacks = callbacks if callbacks is not None else NoCallbacks()
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._changed_at: dict[str, float] = {}  # version -> monotonic time the change was seen
        self._streams: dict[int, StreamState] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._server: grpc.Server | None = None
        self.port = 0
        self._encoder = EdsEncoder(overprovisioning_factor)
        self._encoded: tuple[str, any_pb2.Any] | None = None  # (version, resource): encoded once for all streams
        self._encode_lock = threading.Lock()

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
            self._snapshot = snapshot
            self._changed_at[snapshot.version] = time.monotonic() if changed_at is None else changed_at
            if len(self._changed_at) > 64:
                for v in list(self._changed_at)[:-32]:
                    del self._changed_at[v]
            streams = list(self._streams.values())
        for s in streams:
            s.inbox.put(_WAKE)
        return True

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
                    response = self._response_if_new(stream)
                else:
                    response = self._handle(stream, item)
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
        if req.type_url != EDS_TYPE_URL:
            log.warning(
                "xDS stream %d (node %s): unsupported type %s ignored (this server serves EDS only)",
                stream.id,
                stream.node_id,
                req.type_url,
            )
            return None
        names = frozenset(req.resource_names)
        resubscribed = not stream.subscribed or names != stream.names
        stream.subscribed, stream.names = True, names
        if req.response_nonce:
            if req.response_nonce != stream.sent_nonce:
                return None  # stale: answers a response that was superseded
            if req.HasField("error_detail") and (req.error_detail.code or req.error_detail.message):
                stream.last_nack = req.error_detail.message
                stream.acked_version = req.version_info  # what Envoy still holds
                log.error(
                    "xDS NACK from %s for version %s: %s (keeping version %s)",
                    stream.node_id,
                    stream.sent_version,
                    req.error_detail.message,
                    req.version_info or "none",
                )
                self._callbacks.on_nack(stream.node_id, stream.sent_version, req.error_detail.message)
                return None
            if req.version_info != stream.acked_version:
                stream.acked_version = req.version_info
                with self._lock:
                    seen = self._changed_at.get(req.version_info)
                # Only a change seen while this Envoy was connected is a push; the initial sync
                # of a (re)connecting Envoy is not.
                latency = None if seen is None or seen < stream.opened_at else time.monotonic() - seen
                log.debug(
                    "envoy %s acked %s (%.1f ms after the change was seen)",
                    stream.node_id,
                    req.version_info,
                    (latency or 0) * 1000,
                )
                self._callbacks.on_ack(stream.node_id, req.version_info, latency)
            if not resubscribed:
                return None
        elif req.version_info:
            # A reconnecting Envoy tells us what it holds (from us or a previous agent).
            stream.acked_version = req.version_info
        return self._response(stream, force=True)

    def _resource(self, snap: Snapshot) -> any_pb2.Any:
        """The snapshot's ClusterLoadAssignment as an Any, encoded once per version (EdsEncoder)."""
        with self._encode_lock:
            if self._encoded is None or self._encoded[0] != snap.version:
                self._encoded = (snap.version, any_pb2.Any(type_url=EDS_TYPE_URL, value=self._encoder.encode(snap)))
            return self._encoded[1]

    def _response_if_new(self, stream: StreamState) -> discovery_pb2.DiscoveryResponse | None:
        return self._response(stream, force=False) if stream.subscribed else None

    def _response(self, stream: StreamState, force: bool) -> discovery_pb2.DiscoveryResponse | None:
        snap = self._snapshot
        if snap is None:
            return None  # nothing to serve yet (no catalog read): Envoy keeps what it has
        if not force and snap.version == stream.sent_version:
            return None
        if stream.names and snap.cluster not in stream.names:
            return None
        resource = self._resource(snap)
        nonce = str(next(self._nonces))
        stream.sent_version, stream.sent_nonce = snap.version, nonce
        self._callbacks.on_push(stream.node_id, snap.version)
        return discovery_pb2.DiscoveryResponse(
            version_info=snap.version, resources=[resource], type_url=EDS_TYPE_URL, nonce=nonce
        )
