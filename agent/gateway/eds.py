"""Snapshot -> Envoy ClusterLoadAssignment (EDS). The only module that maps our types to xDS protos."""

from __future__ import annotations

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from agent.gateway.snapshot import EndpointState, Snapshot

EDS_TYPE_URL = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
METADATA_NAMESPACE = "ernie"

_HEALTH = {
    EndpointState.HEALTHY: health_check_pb2.HEALTHY,
    EndpointState.DRAINING: health_check_pb2.DRAINING,
}


def cluster_load_assignment(snapshot: Snapshot) -> endpoint_pb2.ClusterLoadAssignment:
    """One locality, priority 0. Endpoint hostname = instance ID: Envoy's %UPSTREAM_HOST_NAME% then
    names the instance that served in the x-ernie-instance response header."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=snapshot.cluster)
    if not snapshot.endpoints:
        return cla
    locality = cla.endpoints.add()
    for ep in snapshot.endpoints:
        lb = locality.lb_endpoints.add()
        lb.endpoint.address.socket_address.address = ep.address
        lb.endpoint.address.socket_address.port_value = ep.port
        lb.endpoint.hostname = ep.instance_id
        lb.health_status = _HEALTH[ep.state]
        lb.load_balancing_weight.value = ep.weight
        meta = lb.metadata.filter_metadata[METADATA_NAMESPACE]
        meta.update({"instance_id": ep.instance_id, "node": ep.node, "zone": ep.zone, "model": ep.model})
    return cla
