"""The relay learns the gateway's snapshot the way Envoy does: as an ADS client (EDS, state of the
world) of the gateway agent's xDS server. One source of truth, no new protocol. If the agent is
away the relay keeps the last endpoints it had (as Envoy does) and reconnects."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from collections.abc import Callable

import grpc
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from agent.gateway.eds import EDS_TYPE_URL
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
            out.append(
                Member(
                    lb.endpoint.hostname,
                    f"{host}:{sa.port_value}",
                    lb.health_status == health_check_pb2.HEALTHY,
                    locality.priority,
                )
            )
    return out


async def follow(
    xds_address: str, cluster: str, node_id: str, on_members: Callable[[list[Member], str], None], stop: asyncio.Event
) -> None:
    """Subscribe to the cluster's endpoints until `stop`; reconnect with a short capped backoff."""
    backoff = RECONNECT_INITIAL_S
    while not stop.is_set():
        try:
            async with grpc.aio.insecure_channel(xds_address) as channel:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                requests: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
                first = discovery_pb2.DiscoveryRequest(type_url=EDS_TYPE_URL, resource_names=[cluster])
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
                    members: list[Member] = []
                    for res in resp.resources:
                        cla = endpoint_pb2.ClusterLoadAssignment()
                        res.Unpack(cla)
                        if cla.cluster_name == cluster:
                            members = members_of(cla)
                    on_members(members, resp.version_info)
                    await requests.put(
                        discovery_pb2.DiscoveryRequest(
                            type_url=EDS_TYPE_URL,
                            resource_names=[cluster],
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
