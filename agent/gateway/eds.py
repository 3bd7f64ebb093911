"""Snapshot -> Envoy ClusterLoadAssignment (EDS). The only module that maps our types to xDS protos."""

from __future__ import annotations

from itertools import groupby

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from agent.gateway.snapshot import Endpoint, EndpointState, Snapshot

EDS_TYPE_URL = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
METADATA_NAMESPACE = "ernie"
DEFAULT_OVERPROVISIONING_FACTOR = 140  # Envoy's own default

_HEALTH = {
    EndpointState.HEALTHY: health_check_pb2.HEALTHY,
    EndpointState.DRAINING: health_check_pb2.DRAINING,
}


def _locality_key(ep: Endpoint) -> tuple[int, str, str]:
    return ep.priority, ep.datacenter, ep.zone


def cluster_load_assignment(
    snapshot: Snapshot, overprovisioning_factor: int = DEFAULT_OVERPROVISIONING_FACTOR
) -> endpoint_pb2.ClusterLoadAssignment:
    """One Envoy locality per (priority, datacenter, zone): region = the Consul datacenter, zone =
    the engines' zone meta, priority = Endpoint.priority (agent/gateway/config.py, LocalitySettings).
    Envoy sends priority 0 all the traffic while its healthy share x overprovisioning_factor >= 100 %,
    and spills the rest to the next priority as it falls. Endpoint hostname = instance ID: Envoy's
    %UPSTREAM_HOST_NAME% then names the instance that served in the x-ernie-instance header."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=snapshot.cluster)
    cla.policy.overprovisioning_factor.value = overprovisioning_factor
    for (priority, datacenter, zone), group in groupby(
        sorted(snapshot.endpoints, key=_locality_key), key=_locality_key
    ):
        locality = cla.endpoints.add()
        locality.priority = priority
        locality.locality.region = datacenter
        locality.locality.zone = zone
        for ep in group:
            lb = locality.lb_endpoints.add()
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
    return cla
