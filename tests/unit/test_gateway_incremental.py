"""The push path's work follows the change, not the fleet: Consul's answer decoded only where it
changed (HealthDecoder), an unchanged instance keeping its CatalogEntry, Endpoint and xDS bytes
(EndpointCache, EdsEncoder), and the content compared by what changed (same_content)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from agent.catalog.base import CatalogEntry, CheckStatus
from agent.catalog.consul import HealthDecoder
from agent.gateway.eds import EdsEncoder, cluster_load_assignment
from agent.gateway.snapshot import EndpointCache, build_snapshot, with_weights
from agent.gateway.watch import content_key, same_content


def node(i: int, status: str = "passing", output: str = "passing: ok", modify: int = 20) -> dict[str, object]:
    sid = f"ernie-{i:05d}"
    return {
        "Node": {"Node": f"n{i // 8}", "Address": "10.0.0.1", "ModifyIndex": 3},
        "Service": {
            "ID": sid,
            "Service": "ernie",
            "Address": f"10.1.{i // 256}.{i % 256}",
            "Port": 8000,
            "Meta": {"model": "m", "zone": "z1"},
            "Tags": [],
            "ModifyIndex": 12,
        },
        "Checks": [
            {"CheckID": f"service:{sid}", "ServiceID": sid, "Status": status, "Output": output, "ModifyIndex": modify}
        ],
    }


def body(nodes: list[dict[str, object]]) -> bytes:
    return json.dumps(nodes, separators=(",", ":")).encode()


def test_only_the_changed_instance_is_decoded_and_the_others_are_the_same_objects():
    nodes = [node(i) for i in range(50)]
    d = HealthDecoder()
    first = d.decode(body(nodes))
    assert d.decoded == 50 and [e.instance_id for e in first] == [f"ernie-{i:05d}" for i in range(50)]
    again = d.decode(body(nodes))
    assert d.decoded == 50 and all(a is b for a, b in zip(first, again))
    nodes[7] = node(7, "critical", "critical (hung): no tokens", modify=31)
    changed = d.decode(body(nodes))
    assert d.decoded == 51
    assert changed[7].status is CheckStatus.CRITICAL and changed[7].verdict.reason == "no tokens"
    assert all(a is b for k, (a, b) in enumerate(zip(first, changed)) if k != 7)
    del nodes[3]
    shrunk = d.decode(body(nodes))
    assert d.decoded == 51 and len(shrunk) == 49 and "ernie-00003" not in {e.instance_id for e in shrunk}


def test_an_empty_or_null_answer_is_no_instances_and_a_malformed_one_is_an_error():
    d = HealthDecoder()
    assert d.decode(b"[]") == [] and d.decode(b"null") == []
    with pytest.raises(ValueError):
        d.decode(b'{"not": "a list"}')


def entry(i: int, status: CheckStatus = CheckStatus.PASSING) -> CatalogEntry:
    return CatalogEntry(f"ernie-{i:05d}", f"n{i // 8}", f"10.1.{i // 256}.{i % 256}", 8000, status, "", {"zone": "z1"})


def test_same_content_compares_what_changed_and_ignores_order_and_identity():
    a = tuple(entry(i) for i in range(20))
    assert same_content(a, a) and same_content(a, tuple(reversed(a)))
    copies = tuple(entry(i) for i in range(20))  # equal content, other objects (another reader)
    assert same_content(a, copies)
    flipped = a[:5] + (entry(5, CheckStatus.WARNING),) + a[6:]
    assert not same_content(a, flipped)
    assert not same_content(a, a[:-1])
    twice = a[:-1] + (a[0],)  # one object twice: compared in full
    assert same_content(twice, twice) and not same_content(a, twice)
    assert content_key(list(a)) == content_key(list(copies))


def decoded(blob: bytes) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment()
    cla.ParseFromString(blob)
    return cla


def test_the_encoder_sends_what_cluster_load_assignment_builds_and_reuses_unchanged_endpoints():
    cache, enc = EndpointCache(), EdsEncoder()
    es = [entry(i, CheckStatus.WARNING if i % 5 == 0 else CheckStatus.PASSING) for i in range(30)]
    snap = build_snapshot(es, "ernie", cache=cache).snapshot
    assert decoded(enc.encode(snap)) == cluster_load_assignment(snap)
    es2 = list(es)
    es2[4] = entry(4, CheckStatus.CRITICAL)
    es2[9] = entry(9, CheckStatus.WARNING)
    snap2 = build_snapshot(es2, "ernie", cache=cache).snapshot
    kept = {e.instance_id for e in snap.endpoints} - {"ernie-00004", "ernie-00009"}
    before = {e.instance_id: e for e in snap.endpoints}
    assert all(before[e.instance_id] is e for e in snap2.endpoints if e.instance_id in kept)
    assert snap2.version != snap.version and len(snap2.endpoints) == 29
    assert decoded(enc.encode(snap2)) == cluster_load_assignment(snap2)
    weighted = with_weights(snap2, lambda iid: 300 if iid == "ernie-00001" else 100)
    assert decoded(enc.encode(weighted)) == cluster_load_assignment(weighted)
    assert with_weights(snap2, lambda _iid: 100) is snap2
    empty = build_snapshot([], "ernie", cache=cache).snapshot
    assert decoded(enc.encode(empty)) == cluster_load_assignment(empty)


def test_the_encoder_matches_with_localities_and_priorities():
    cache, enc = EndpointCache(), EdsEncoder(overprovisioning_factor=120)
    es = [replace(entry(i), datacenter="dc1" if i % 3 else "dc2", meta={"zone": f"z{i % 2}"}) for i in range(24)]
    prio = lambda zone, dc: (0 if zone == "z0" else 1) if dc == "dc1" else 2  # noqa: E731
    snap = build_snapshot(es, "ernie", prio, cache=cache).snapshot
    assert {e.priority for e in snap.endpoints} == {0, 1, 2}
    assert decoded(enc.encode(snap)) == cluster_load_assignment(snap, 120)
    es[5] = replace(es[5], status=CheckStatus.WARNING)
    snap2 = build_snapshot(es, "ernie", prio, cache=cache).snapshot
    assert decoded(enc.encode(snap2)) == cluster_load_assignment(snap2, 120)
