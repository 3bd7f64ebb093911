"""The ADS server speaking to a gRPC client that plays Envoy (loopback, no Envoy needed)."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from agent.gateway.eds import EDS_TYPE_URL
from agent.gateway.snapshot import Endpoint, EndpointState, Snapshot
from agent.gateway.xds import AdsServer

TIMEOUT_S = 5.0


def snap(*ports: int, draining: tuple[int, ...] = ()) -> Snapshot:
    return Snapshot(
        "ernie",
        tuple(
            Endpoint(f"e{p}", "127.0.0.1", p, EndpointState.DRAINING if p in draining else EndpointState.HEALTHY)
            for p in sorted(ports)
        ),
    )


class FakeEnvoy:
    """One ADS stream: send requests, read responses."""

    def __init__(self, port: int, node: str = "gw-1"):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        self.responses: queue.Queue[discovery_pb2.DiscoveryResponse] = queue.Queue()
        self.node = node
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.StreamAggregatedResources(iter(self.requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for r in self.call:
                self.responses.put(r)
        except grpc.RpcError:
            pass

    def send(self, version="", nonce="", error="", names=("ernie",), first=False):
        req = discovery_pb2.DiscoveryRequest(
            type_url=EDS_TYPE_URL, version_info=version, response_nonce=nonce, resource_names=list(names)
        )
        if first:
            req.node.id = self.node
        if error:
            req.error_detail.code = 3
            req.error_detail.message = error
        self.requests.put(req)

    def recv(self, timeout=TIMEOUT_S) -> discovery_pb2.DiscoveryResponse:
        return self.responses.get(timeout=timeout)

    def nothing(self, timeout=0.3) -> bool:
        try:
            self.responses.get(timeout=timeout)
        except queue.Empty:
            return True
        return False

    def close(self):
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


def wait_for(cond, timeout_s=TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def ports_of(resp) -> list[tuple[int, int]]:
    cla = endpoint_pb2.ClusterLoadAssignment()
    resp.resources[0].Unpack(cla)
    return [
        (lb.endpoint.address.socket_address.port_value, lb.health_status)
        for loc in cla.endpoints
        for lb in loc.lb_endpoints
    ]


class Events:
    """XdsCallbacks that record what the server reported."""

    def __init__(self):
        self.events = {"ack": [], "nack": [], "push": []}

    def on_push(self, *a):
        self.events["push"].append(a)

    def on_ack(self, *a):
        self.events["ack"].append(a)

    def on_nack(self, *a):
        self.events["nack"].append(a)


@pytest.fixture
def server():
    callbacks = Events()
    s = AdsServer("127.0.0.1:0", callbacks=callbacks).start()
    s.events = callbacks.events
    yield s
    s.stop()


def test_no_snapshot_no_answer_then_push(server):
    env = FakeEnvoy(server.port)
    env.send(first=True)
    assert env.nothing()  # nothing to serve yet: Envoy keeps what it has
    s1 = snap(8001, 8002)
    assert server.publish(s1) is True
    r = env.recv()
    assert r.version_info == s1.version and r.type_url == EDS_TYPE_URL
    assert [p for p, _ in ports_of(r)] == [8001, 8002]
    env.close()


def test_ack_reports_latency_and_new_versions_are_pushed_at_once(server):
    s1 = snap(8001)
    server.publish(s1)
    env = FakeEnvoy(server.port)
    env.send(first=True)
    r1 = env.recv()
    env.send(version=r1.version_info, nonce=r1.nonce)
    assert wait_for(lambda: len(server.events["ack"]) == 1)  # else the ACK may arrive stale (ignored)
    s2 = snap(8001, 8002, draining=(8001,))
    assert server.publish(s2, changed_at=None) is True
    assert server.publish(s2) is False  # same version: nothing to do
    r2 = env.recv()
    assert r2.version_info == s2.version and r2.nonce != r1.nonce
    assert ports_of(r2)[0][1] == 3  # DRAINING
    env.send(version=r2.version_info, nonce=r2.nonce)
    assert wait_for(lambda: len(server.events["ack"]) >= 2)
    acks = server.events["ack"]
    assert [a[1] for a in acks] == [s1.version, s2.version]
    assert acks[0][2] is None  # initial sync of a new stream is not a push
    assert acks[1][0] == "gw-1" and 0 <= acks[1][2] < TIMEOUT_S
    assert [s.acked_version for s in server.streams()] == [s2.version]
    env.close()


def test_nack_is_recorded_and_not_resent_stale_nonce_ignored(server):
    server.publish(snap(8001))
    env = FakeEnvoy(server.port)
    env.send(first=True)
    r1 = env.recv()
    env.send(version=r1.version_info, nonce=r1.nonce)
    assert wait_for(lambda: len(server.events["ack"]) == 1)
    server.publish(snap(8001, 8002))
    r2 = env.recv()
    env.send(version=r1.version_info, nonce="stale-nonce", error="ignored")
    env.send(version=r1.version_info, nonce=r2.nonce, error="malformed IP address: nope")
    assert env.nothing()  # the rejected version is not pushed again
    assert wait_for(lambda: server.streams()[0].last_nack)
    stream = server.streams()[0]
    assert stream.last_nack == "malformed IP address: nope"
    assert stream.acked_version == r1.version_info
    assert [n[2] for n in server.events["nack"]] == ["malformed IP address: nope"]
    server.publish(snap(8003))  # a newer version is pushed again
    assert [p for p, _ in ports_of(env.recv())] == [8003]
    env.close()


def test_every_connected_envoy_gets_the_push(server):
    server.publish(snap(8001))
    envs = [FakeEnvoy(server.port, node=f"gw-{i}") for i in range(3)]
    for env in envs:
        env.send(first=True)
        r = env.recv()
        env.send(version=r.version_info, nonce=r.nonce)
    s2 = snap(8002)
    server.publish(s2)
    assert all(env.recv().version_info == s2.version for env in envs)
    for env in envs:
        env.close()


def test_reconnecting_envoy_gets_the_current_snapshot(server):
    s1 = snap(8001)
    server.publish(s1)
    env = FakeEnvoy(server.port)
    env.send(first=True, version="old-version-from-previous-agent")
    assert env.recv().version_info == s1.version
    env.close()


def test_unsubscribed_cluster_gets_nothing(server):
    server.publish(snap(8001))
    env = FakeEnvoy(server.port)
    env.send(first=True, names=("other",))
    assert env.nothing()
    env.close()


def test_gateway_metrics_are_the_servers_callbacks():
    from agent.gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    s = AdsServer("127.0.0.1:0", callbacks=metrics).start()
    sample = metrics.registry.get_sample_value
    try:
        s.publish(snap(8001))
        env = FakeEnvoy(s.port)
        env.send(first=True)
        r1 = env.recv()
        env.send(version=r1.version_info, nonce=r1.nonce)
        assert wait_for(lambda: [st.acked_version for st in s.streams()] == [r1.version_info])
        assert sample("ernie_gateway_xds_pushes_total") == 1
        assert sample("ernie_gateway_xds_push_latency_seconds_count") == 0  # an initial sync is not a push
        s.publish(snap(8001, 8002))
        r2 = env.recv()
        env.send(version=r2.version_info, nonce=r2.nonce)
        assert wait_for(lambda: sample("ernie_gateway_xds_push_latency_seconds_count") == 1)
        s.publish(snap(8003))
        r3 = env.recv()
        env.send(version=r2.version_info, nonce=r3.nonce, error="bad endpoint")
        assert wait_for(lambda: sample("ernie_gateway_xds_nacks_total") == 1)
        assert sample("ernie_gateway_xds_pushes_total") == 3
        env.close()
    finally:
        s.stop()


def test_a_server_without_callbacks_serves_all_the_same():
    s = AdsServer("127.0.0.1:0").start()
    try:
        s1 = snap(8001)
        s.publish(s1)
        env = FakeEnvoy(s.port)
        env.send(first=True)
        r = env.recv()
        env.send(version=r.version_info, nonce=r.nonce)
        assert r.version_info == s1.version
        assert wait_for(lambda: [st.acked_version for st in s.streams()] == [s1.version])
        env.close()
    finally:
        s.stop()
