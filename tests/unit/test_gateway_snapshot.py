"""Snapshot building and validation: a pure function of catalog entries."""

from __future__ import annotations

import dataclasses

import pytest

from agent.catalog.base import CatalogEntry, CheckStatus
from agent.gateway.agent import snapshot_diff
from agent.gateway.eds import cluster_load_assignment
from agent.gateway.snapshot import Endpoint, EndpointState, Snapshot, SnapshotError, build_snapshot


def entry(
    iid: str,
    port: int,
    status: CheckStatus = CheckStatus.PASSING,
    address: str = "10.0.0.1",
    node: str = "n1",
    **meta: str,
) -> CatalogEntry:
    return CatalogEntry(
        instance_id=iid, node=node, address=address, port=port, status=status, note=status.value, meta=meta
    )


def test_states_map_to_endpoints_and_critical_is_omitted():
    result = build_snapshot(
        [
            entry("a", 8001, CheckStatus.PASSING),
            entry("b", 8002, CheckStatus.WARNING),
            entry("c", 8003, CheckStatus.CRITICAL),
        ],
        "ernie",
    )
    snap = result.snapshot
    assert [(e.instance_id, e.state) for e in snap.endpoints] == [
        ("a", EndpointState.HEALTHY),
        ("b", EndpointState.DRAINING),
    ]
    assert result.omitted == 1 and result.rejected == ()
    assert snap.count(EndpointState.HEALTHY) == 1 and snap.count(EndpointState.DRAINING) == 1


def test_version_is_a_content_hash_independent_of_order():
    a = build_snapshot([entry("a", 8001), entry("b", 8002)], "ernie").snapshot
    b = build_snapshot([entry("b", 8002), entry("a", 8001)], "ernie").snapshot
    assert a == b and a.version == b.version and len(a.version) == 16
    c = build_snapshot([entry("a", 8001), entry("b", 8002, CheckStatus.WARNING)], "ernie").snapshot
    assert c.version != a.version
    # a note change (same state) is not an endpoint change
    d = build_snapshot(
        [entry("a", 8001), CatalogEntry("b", "n1", "10.0.0.1", 8002, CheckStatus.PASSING, note="passing: canary ok")],
        "ernie",
    ).snapshot
    assert d.version == a.version


def test_empty_catalog_gives_an_empty_snapshot():
    snap = build_snapshot([], "ernie").snapshot
    assert snap.endpoints == () and snap.version
    assert len(cluster_load_assignment(snap).endpoints) == 0


@pytest.mark.parametrize(
    "bad, reason",
    [
        (entry("x", 0), "port 0 out of range"),
        (entry("x", 70000), "port 70000 out of range"),
        (entry("x", 8001, address=""), "empty address"),
        (entry("x", 8001, address="gpu1.example"), "not an IP address"),
        (entry("", 8001), "empty instance id"),
    ],
)
def test_unusable_entries_are_rejected_not_fatal(bad, reason):
    result = build_snapshot([entry("a", 8001, address="10.0.0.2"), bad], "ernie")
    assert [e.instance_id for e in result.snapshot.endpoints] == ["a"]
    assert len(result.rejected) == 1 and reason in result.rejected[0].reason


def test_duplicates_keep_one_deterministically():
    result = build_snapshot([entry("a", 8001, node="n2", address="10.0.0.2"), entry("a", 8001, node="n1")], "ernie")
    assert [(e.instance_id, e.node) for e in result.snapshot.endpoints] == [("a", "n1")]
    assert "duplicate id" in result.rejected[0].reason
    result = build_snapshot([entry("a", 8001), entry("b", 8001)], "ernie")
    assert [e.instance_id for e in result.snapshot.endpoints] == ["a"]
    assert "already used" in result.rejected[0].reason


def test_snapshot_invariants_are_checked_on_construction():
    ok = Endpoint("a", "10.0.0.1", 8001, EndpointState.HEALTHY)
    with pytest.raises(SnapshotError, match="duplicate"):
        Snapshot("ernie", (ok, Endpoint("a", "10.0.0.2", 8001, EndpointState.HEALTHY)))
    with pytest.raises(SnapshotError, match="share"):
        Snapshot("ernie", (ok, Endpoint("b", "10.0.0.1", 8001, EndpointState.HEALTHY)))
    with pytest.raises(SnapshotError, match="out of range"):
        Snapshot("ernie", (Endpoint("a", "10.0.0.1", 0, EndpointState.HEALTHY),))
    with pytest.raises(SnapshotError, match="sorted"):
        Snapshot("ernie", (Endpoint("b", "10.0.0.2", 1, EndpointState.HEALTHY), ok))
    with pytest.raises(SnapshotError, match="does not match"):
        Snapshot("ernie", (ok,), version="0000000000000000")
    with pytest.raises(SnapshotError, match="cluster"):
        Snapshot("", (ok,))
    snap = Snapshot("ernie", (ok,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.version = "x"  # type: ignore[misc]  # frozen


def test_meta_travels_to_envoy_endpoint_metadata_and_hostname():
    snap = build_snapshot([entry("ernie-n1-8001", 8001, zone="rack-1", served_model_name="ernie")], "ernie").snapshot
    ep = snap.endpoints[0]
    assert (ep.zone, ep.model) == ("rack-1", "ernie")
    cla = cluster_load_assignment(snap)
    lb = cla.endpoints[0].lb_endpoints[0]
    assert cla.cluster_name == "ernie"
    assert lb.endpoint.hostname == "ernie-n1-8001"
    assert lb.endpoint.address.socket_address.port_value == 8001
    assert lb.metadata.filter_metadata["ernie"]["instance_id"] == "ernie-n1-8001"


def test_draining_maps_to_envoy_draining():
    from envoy.config.core.v3 import health_check_pb2

    snap = build_snapshot([entry("a", 8001), entry("b", 8002, CheckStatus.WARNING)], "ernie").snapshot
    statuses = [lb.health_status for lb in cluster_load_assignment(snap).endpoints[0].lb_endpoints]
    assert statuses == [health_check_pb2.HEALTHY, health_check_pb2.DRAINING]


def test_diff_names_what_changed():
    a = build_snapshot([entry("a", 8001), entry("b", 8002)], "ernie").snapshot
    b = build_snapshot([entry("a", 8001, CheckStatus.WARNING), entry("c", 8003)], "ernie").snapshot
    assert snapshot_diff(a, b) == "a draining, -b, +c healthy"
    assert snapshot_diff(None, a) == "+a healthy, +b healthy"
    assert snapshot_diff(a, a) == "no endpoint change"


def test_held_endpoints_fill_in_absent_instances_only():
    from agent.gateway.snapshot import with_held

    previous = build_snapshot(
        [entry("a", 8001), entry("b", 8002, CheckStatus.WARNING), entry("c", 8003)], "ernie"
    ).snapshot
    now = build_snapshot([entry("a", 8001, CheckStatus.WARNING), entry("d", 8003)], "ernie").snapshot
    merged = with_held(now, previous, frozenset({"b", "c"}))
    # a: current state wins; b: held as it was; c: its address is now d's, so not held
    assert [(e.instance_id, e.state.value) for e in merged.endpoints] == [
        ("a", "draining"),
        ("b", "draining"),
        ("d", "healthy"),
    ]
    assert with_held(now, previous, frozenset()) is now
