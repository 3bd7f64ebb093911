"""Snapshot -> Envoy ClusterLoadAssignment (EDS) and the models' Clusters (CDS). The only module that
maps our types to xDS protos."""

from __future__ import annotations

import copy
import importlib
from itertools import groupby
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import json_format

from agent.gateway.snapshot import Endpoint, EndpointState, Snapshot

EDS_TYPE_URL = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
CDS_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
METADATA_NAMESPACE = "ernie"
DEFAULT_OVERPROVISIONING_FACTOR = 140  # Envoy's own default
# The types a cluster's typed configs may name must be in protobuf's pool for ParseDict: the engine
# cluster's protocol options and the credential injector's upstream filters (engine_credential.py).
# Imported when the first cluster is built (the relay, which only reads clusters, never needs them).
_TYPED_CONFIG_MODULES = (
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
    "envoy.extensions.filters.http.credential_injector.v3.credential_injector_pb2",
    "envoy.extensions.filters.http.upstream_codec.v3.upstream_codec_pb2",
    "envoy.extensions.http.injected_credentials.generic.v3.generic_pb2",
)

_HEALTH = {
    EndpointState.HEALTHY: health_check_pb2.HEALTHY,
    EndpointState.DRAINING: health_check_pb2.DRAINING,
}


def _locality_key(ep: Endpoint) -> tuple[int, str, str]:
    return ep.priority, ep.datacenter, ep.zone


def cluster_load_assignment(
    snapshot: Snapshot, overprovisioning_factor: int = DEFAULT_OVERPROVISIONING_FACTOR, cluster: str = ""
) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints of `cluster` (default: the base cluster, every endpoint; or a model's cluster).
    One Envoy locality per (priority, datacenter, zone): region = the Consul datacenter, zone =
    the engines' zone meta, priority = Endpoint.priority (agent/gateway/config.py, LocalitySettings).
    Envoy sends priority 0 all the traffic while its healthy share x overprovisioning_factor >= 100 %,
    and spills the rest to the next priority as it falls. Endpoint hostname = instance ID: Envoy's
    %UPSTREAM_HOST_NAME% then names the instance that served in the x-ernie-instance header."""
    name = cluster or snapshot.cluster
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    cla.policy.overprovisioning_factor.value = overprovisioning_factor
    for (priority, datacenter, zone), group in groupby(
        sorted(snapshot.endpoints_of(name), key=_locality_key), key=_locality_key
    ):
        locality = cla.endpoints.add()
        locality.priority = priority
        locality.locality.region = datacenter
        locality.locality.zone = zone
        locality.lb_endpoints.extend(lb_endpoint(ep) for ep in group)
    return cla


def lb_endpoint(ep: Endpoint) -> endpoint_components_pb2.LbEndpoint:
    """One endpoint as Envoy gets it (hostname = instance ID)."""
    lb = endpoint_components_pb2.LbEndpoint()
    lb.endpoint.address.socket_address.address = ep.address
    lb.endpoint.address.socket_address.port_value = ep.port
    lb.endpoint.hostname = ep.instance_id
    lb.health_status = _HEALTH[ep.state]
    lb.load_balancing_weight.value = ep.weight
    meta = lb.metadata.filter_metadata[METADATA_NAMESPACE]
    meta.update(
        {
            "instance_id": ep.instance_id,
            "node": ep.node,
            "zone": ep.zone,
            "model": ep.model,
            "datacenter": ep.datacenter,
        }
    )
    if ep.max_model_len:
        meta.update({"max_model_len": ep.max_model_len})
    return lb


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _framed(tag: bytes, payload: bytes) -> bytes:
    """One length-delimited protobuf field: its tag, the payload's length, the payload."""
    return tag + _varint(len(payload)) + payload


# Wire tags (field number << 3 | 2, length-delimited) of the repeated fields the encoder frames.
_CLA_ENDPOINTS = b"\x12"  # ClusterLoadAssignment.endpoints = 2
_LOCALITY_LB_ENDPOINTS = b"\x12"  # LocalityLbEndpoints.lb_endpoints = 2


class EdsEncoder:
    """Snapshot -> the serialized ClusterLoadAssignment, each endpoint encoded once.

    A repeated protobuf field is its elements' encodings one after another, so the assignment is
    assembled from bytes: the cluster's own fields, then per locality its own fields and the cached
    encoding of each of its endpoints (kept per Endpoint object from one snapshot to the next; the
    snapshot builder keeps an unchanged instance's Endpoint). What Envoy gets is the same message as
    cluster_load_assignment(snapshot) (tests/unit/test_gateway_incremental.py)."""

    def __init__(self, overprovisioning_factor: int = DEFAULT_OVERPROVISIONING_FACTOR) -> None:
        self.overprovisioning_factor = overprovisioning_factor
        self._lb: dict[str, dict[int, tuple[Endpoint, bytes]]] = {}  # per cluster

    def encode(self, snapshot: Snapshot, cluster: str = "") -> bytes:
        """The assignment of `cluster` (default: the base cluster; or a model's cluster)."""
        name = cluster or snapshot.cluster
        head = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        head.policy.overprovisioning_factor.value = self.overprovisioning_factor
        parts = [bytes(head.SerializeToString())]
        last: dict[int, tuple[Endpoint, bytes]] = self._lb.get(name, {})
        cache: dict[int, tuple[Endpoint, bytes]] = {}
        for (priority, datacenter, zone), group in groupby(
            sorted(snapshot.endpoints_of(name), key=_locality_key), key=_locality_key
        ):
            locality = endpoint_components_pb2.LocalityLbEndpoints(priority=priority)
            locality.locality.region = datacenter
            locality.locality.zone = zone
            body = [bytes(locality.SerializeToString())]
            for ep in group:
                hit = last.get(id(ep))
                if hit is None or hit[0] is not ep:
                    hit = (ep, _framed(_LOCALITY_LB_ENDPOINTS, bytes(lb_endpoint(ep).SerializeToString())))
                cache[id(ep)] = hit
                body.append(hit[1])
            parts.append(_framed(_CLA_ENDPOINTS, b"".join(body)))
        self._lb[name] = cache
        return b"".join(parts)

    def forget(self, clusters: set[str]) -> None:
        """Drop the cached encodings of clusters that are gone (a model no instance serves any more)."""
        for name in set(self._lb) - clusters:
            del self._lb[name]


def model_clusters(snapshot: Snapshot, template: dict[str, Any]) -> list[cluster_pb2.Cluster]:
    """One EDS cluster per known model, each a copy of `template` (the base engine cluster as the
    bootstrap defines it: balancing, load bound, outlier detection, circuit breakers, keepalive,
    the engines' credential), with its own name, EDS resource and `ernie.model` metadata."""
    for module in _TYPED_CONFIG_MODULES:
        importlib.import_module(module)
    out = []
    for name, model in sorted(snapshot.model_clusters().items()):
        doc = copy.deepcopy(template)
        doc["name"] = name
        doc.setdefault("eds_cluster_config", {})["service_name"] = name
        doc.pop("load_assignment", None)
        doc.setdefault("metadata", {}).setdefault("filter_metadata", {})[METADATA_NAMESPACE] = {"model": model}
        cluster = cluster_pb2.Cluster()
        json_format.ParseDict(doc, cluster)
        out.append(cluster)
    return out


def model_of_cluster(cluster: cluster_pb2.Cluster) -> str:
    """The model a cluster of `model_clusters` serves ('' for any other cluster)."""
    meta = cluster.metadata.filter_metadata.get(METADATA_NAMESPACE)
    value = meta.fields.get("model") if meta is not None else None
    return value.string_value if value is not None else ""
