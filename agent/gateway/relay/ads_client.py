"""The relay learns the gateway's snapshot the way Envoy does: as an ADS client (EDS of the engine
cluster, CDS for the models' clusters; state of the world) of the gateway agent's xDS server. One
source of truth, no new protocol. If the agent is away the relay keeps the last endpoints it had
(as Envoy does) and reconnects."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from collections.abc import Callable

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from agent.gateway.eds import CDS_TYPE_URL, EDS_TYPE_URL, METADATA_NAMESPACE, model_of_cluster
from agent.gateway.relay.membership import Member

log = logging.getLogger(__name__)

RECONNECT_INITIAL_S = 0.1
RECONNECT_MAX_S = 1.0


def members_of(cla: endpoint_pb2.ClusterLoadAssignment) -> list[Member]:
    out = []
    for locality in cla.endpoints:
        for lb in locality.lb_endpoints:
            if lb.health_status not in (health_check_pb2.HEALTHY, health_check_pb2.DRAINING):
                continue
            sa = lb.endpoint.address.socket_address
            host = f"[{sa.address}]" if ":" in sa.address else sa.address
            meta = lb.metadata.filter_metadata.get(METADATA_NAMESPACE)
            fields = meta.fields if meta is not None else {}
            model = fields["model"].string_value if "model" in fields else ""
            max_len = int(fields["max_model_len"].number_value) if "max_model_len" in fields else 0
            out.append(
                Member(
                    lb.endpoint.hostname,
                    f"{host}:{sa.port_value}",
                    lb.health_status == health_check_pb2.HEALTHY,
                    locality.priority,
                    model=model,
                    max_model_len=max_len,
                )
            )
    return out


def models_of(clusters: list[cluster_pb2.Cluster]) -> dict[str, str]:
    """model -> its Envoy cluster, from the models' clusters (CDS)."""
    return {m: c.name for c in clusters if (m := model_of_cluster(c))}


async def follow(
    xds_address: str,
    cluster: str,
    node_id: str,
    on_members: Callable[[list[Member], str], None],
    stop: asyncio.Event,
    on_models: Callable[[dict[str, str]], None] = lambda _models: None,
) -> None:
    """Subscribe to the cluster's endpoints (EDS) and the models' clusters (CDS) until `stop`;
    reconnect with a short capped backoff."""
    backoff = RECONNECT_INITIAL_S
    names = {EDS_TYPE_URL: [cluster], CDS_TYPE_URL: []}
    while not stop.is_set():
        try:
            async with grpc.aio.insecure_channel(xds_address) as channel:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                requests: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
                for i, type_url in enumerate((CDS_TYPE_URL, EDS_TYPE_URL)):
                    first = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names[type_url])
                    if i == 0:
                        first.node.id, first.node.cluster = node_id, "ernie-gateway-relay"
                    await requests.put(first)

                async def outgoing(
                    queue: asyncio.Queue[discovery_pb2.DiscoveryRequest] = requests,
                ) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
                    while True:
                        yield await queue.get()

                call = stub.StreamAggregatedResources(outgoing())
                async for resp in call:
                    backoff = RECONNECT_INITIAL_S
                    if resp.type_url == CDS_TYPE_URL:
                        clusters = []
                        for res in resp.resources:
                            c = cluster_pb2.Cluster()
                            res.Unpack(c)
                            clusters.append(c)
                        on_models(models_of(clusters))
                    elif resp.type_url == EDS_TYPE_URL:
                        members: list[Member] = []
                        for res in resp.resources:
                            cla = endpoint_pb2.ClusterLoadAssignment()
                            res.Unpack(cla)
                            if cla.cluster_name == cluster:
                                members = members_of(cla)
                        on_members(members, resp.version_info)
                    else:
                        continue
                    await requests.put(
                        discovery_pb2.DiscoveryRequest(
                            type_url=resp.type_url,
                            resource_names=names[resp.type_url],
                            version_info=resp.version_info,
                            response_nonce=resp.nonce,
                        )
                    )
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            log.debug("xDS stream to %s ended: %s", xds_address, e.code())
        except Exception:  # noqa: BLE001 - the subscription must survive anything; it is logged
            log.exception("xDS subscription failed")
        try:
            await asyncio.wait_for(stop.wait(), backoff)
        except TimeoutError:
            pass
        backoff = min(backoff * 2, RECONNECT_MAX_S)
