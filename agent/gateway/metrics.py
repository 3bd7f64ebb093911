"""The gateway agent's Prometheus metrics (own registry, served on `metrics` by a tiny HTTP server)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from agent.gateway.snapshot import EndpointState, Snapshot

PUSH_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class PerInstance:
    """A gauge by instance whose instances come and go: set() replaces every value, and the labels of
    instances no longer present are removed (no stale series)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry):
        self.gauge = Gauge(name, documentation, ["instance_id"], registry=registry)
        self._present: set[str] = set()

    def set(self, values: Mapping[str, float]) -> None:
        for gone in self._present - set(values):
            self.gauge.remove(gone)
        for instance, value in values.items():
            self.gauge.labels(instance).set(value)
        self._present = set(values)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.endpoints = Gauge(
            "ernie_gateway_endpoints", "Endpoints in the published snapshot, by state", ["state"], registry=r
        )
        self.snapshot_generation = Gauge(
            "ernie_gateway_snapshot_generation",
            "Snapshots published by this agent since start (increments per change)",
            registry=r,
        )
        self.snapshot_info = Gauge(
            "ernie_gateway_snapshot_version_info", "1 for the published snapshot version", ["version"], registry=r
        )
        self.model_endpoints = Gauge(
            "ernie_gateway_model_endpoints",
            "Endpoints in the published snapshot, by served model name and state (a model with no "
            "instance passing is listed with 0 healthy while an instance of it is registered)",
            ["model", "state"],
            registry=r,
        )
        self._models: set[str] = set()
        self.rejected = Gauge(
            "ernie_gateway_snapshot_rejected_endpoints",
            "Catalog entries left out of the snapshot because Envoy could not use them",
            registry=r,
        )
        self.pushes = Counter("ernie_gateway_xds_pushes_total", "Snapshots pushed to Envoy over ADS", registry=r)
        self.nacks = Counter("ernie_gateway_xds_nacks_total", "Snapshots Envoy rejected (NACK)", registry=r)
        self.push_latency = Histogram(
            "ernie_gateway_xds_push_latency_seconds",
            "From a catalog change seen by the watch to Envoy's ACK of it",
            buckets=PUSH_BUCKETS_S,
            registry=r,
        )
        self.xds_streams = Gauge("ernie_gateway_xds_streams", "Connected Envoy ADS streams", registry=r)
        self.watch_errors = Counter("ernie_gateway_consul_watch_errors_total", "Failed catalog reads", registry=r)
        self.last_success = Gauge(
            "ernie_gateway_consul_last_success_timestamp_seconds",
            "Unix time of the last successful catalog read (blocking reads last up to the watch wait)",
            registry=r,
        )
        self.consul_up = Gauge(
            "ernie_gateway_consul_up",
            "1 while the catalog watch succeeds; 0 while it fails (the last snapshot is served)",
            registry=r,
        )
        self.envoy_restarts = Counter("ernie_gateway_envoy_restarts_total", "Envoy restarts by the agent", registry=r)
        self.envoy_up = Gauge("ernie_gateway_envoy_up", "1 while the supervised Envoy is live and ready", registry=r)
        self.api_keys = Gauge("ernie_gateway_api_keys", "API keys the edge accepts (last read)", registry=r)
        self.relays_up = Gauge("ernie_gateway_relays_up", "Relay processes accepting on their socket", registry=r)
        self.relay_restarts = Counter(
            "ernie_gateway_relay_restarts_total", "Relay process restarts by the agent", registry=r
        )
        self.routing = Gauge(
            "ernie_gateway_routing_info", "1 for this gateway's [routing] mode and key", ["mode", "key"], registry=r
        )
        self.instance_share = PerInstance(
            "ernie_gateway_instance_share",
            "Each instance's share of the requests this gateway's Envoy routed over the last minute",
            r,
        )
        self.instance_weight = PerInstance(
            "ernie_gateway_instance_weight",
            "Each instance's share of new work (100 = full; smaller when it is much slower than the fleet)",
            r,
        )

    def include_relays(self, metrics_dir: str) -> None:
        """Serve the relay processes' metrics (ernie_gateway_relay_*, multiprocess files) with the agent's."""
        from prometheus_client import multiprocess

        # prometheus_client ships py.typed but leaves MultiProcessCollector.__init__ unannotated.
        multiprocess.MultiProcessCollector(self.registry, path=metrics_dir)  # type: ignore[no-untyped-call]

    # WatchMetrics protocol
    def watch_error(self) -> None:
        self.watch_errors.inc()
        self.consul_up.set(0)

    def watch_success(self, unix_time: float) -> None:
        self.last_success.set(unix_time)
        self.consul_up.set(1)

    # XdsCallbacks protocol (agent/gateway/xds.py), called from the ADS stream threads
    def on_push(self, node_id: str, version: str) -> None:
        self.pushes.inc()

    def on_ack(self, node_id: str, version: str, latency_s: float | None) -> None:
        if latency_s is not None:  # None: an initial sync, not a push
            self.push_latency.observe(latency_s)

    def on_nack(self, node_id: str, version: str, message: str) -> None:
        self.nacks.inc()

    def published(self, snapshot: Snapshot, previous: Snapshot | None, rejected: int) -> None:
        for state in EndpointState:
            self.endpoints.labels(state.value).set(snapshot.count(state))
        for gone in self._models - set(snapshot.models):
            for state in EndpointState:
                self.model_endpoints.remove(gone, state.value)
        for model in snapshot.models:
            for state in EndpointState:
                n = sum(1 for e in snapshot.endpoints if e.model == model and e.state is state)
                self.model_endpoints.labels(model, state.value).set(n)
        self._models = set(snapshot.models)
        if previous is not None and previous.version != snapshot.version:
            try:
                self.snapshot_info.remove(previous.version)
            except KeyError:
                pass  # never labelled (first publish after a restart of the agent)
        self.snapshot_info.labels(snapshot.version).set(1)
        self.snapshot_generation.inc()
        self.rejected.set(rejected)

    def serve(self, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Start the /metrics HTTP server; returns (server, thread) for shutdown."""
        return start_http_server(port, addr=host, registry=self.registry)
