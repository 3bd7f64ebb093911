"""Datacenters and zones: priorities (config), Envoy localities (EDS), a remote datacenter's
instances kept for remote_keep_s then dropped (agent), the relay's continuations stay near."""

from __future__ import annotations

import asyncio

import pytest

from agent.catalog.base import CatalogEntry, CheckStatus
from agent.catalog.memory import MemoryCatalog
from agent.config import ConfigError, build
from agent.gateway.agent import GatewayAgent
from agent.gateway.config import GatewayConfig, LocalitySettings, finish
from agent.gateway.eds import cluster_load_assignment
from agent.gateway.metrics import GatewayMetrics
from agent.gateway.relay.ads_client import members_of
from agent.gateway.relay.membership import Member, Membership
from agent.gateway.snapshot import build_snapshot
from agent.gateway.watch import WatchUpdate
from tests.unit.test_gateway_agent import Clock, FakeAds, FakeEnvoy


def entry(iid, port, dc="dc1", zone="", status=CheckStatus.PASSING):
    return CatalogEntry(iid, f"node-{iid}", "10.0.0.1", port, status, meta={"zone": zone}, datacenter=dc)


def test_priorities_same_zone_same_dc_then_other_dcs_in_the_order_listed():
    loc = LocalitySettings(zone="a", datacenters=("dc1", "dc2", "dc3"))
    assert loc.remote("dc1") == ("dc2", "dc3")  # a shared config may list the gateway's own
    assert loc.priority("a", "dc1", "dc1") == 0
    assert loc.priority("b", "dc1", "dc1") == 1
    assert loc.priority("", "", "dc1") == 1  # a catalog that does not say: the gateway's own
    assert loc.priority("a", "dc2", "dc1") == 2  # a zone of another datacenter is not ours
    assert loc.priority("a", "dc3", "dc1") == 3
    assert loc.priority("", "dc9", "dc1") == 4  # not listed: after the listed ones
    # no zone configured: the whole datacenter is one priority
    assert LocalitySettings().priority("a", "dc1", "dc1") == 1


@pytest.mark.parametrize(
    "locality, message",
    [
        ({"zone": "a b"}, "locality.zone"),
        ({"datacenters": ["dc 2"]}, "not a Consul datacenter name"),
        ({"datacenters": ["dc2", "dc2"]}, "listed twice"),
        ({"same_zone": 2, "same_dc": 1}, "must not prefer farther"),
        ({"other_dc": -1}, "0-127"),
        ({"overprovisioning_factor": 50}, "overprovisioning_factor"),
        ({"remote_keep_s": -1}, "remote_keep_s"),
        ({"remote_watch_wait_s": 0}, "remote_watch_wait_s"),
        ({"datacenters": 5}, "locality.datacenters"),
    ],
)
def test_bad_locality_settings_are_one_line_errors(locality, message):
    with pytest.raises(ConfigError) as e:
        build(GatewayConfig, {"locality": locality}, where="")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_eds_one_locality_per_priority_datacenter_and_zone_with_the_overprovisioning_factor():
    loc = LocalitySettings(zone="a", datacenters=("dc2",))
    entries = [
        entry("e1", 8001, zone="a"),
        entry("e2", 8002, zone="b"),
        entry("e3", 8003, zone="b"),
        entry("f1", 9001, dc="dc2", zone="a"),
    ]
    snap = build_snapshot(entries, "ernie", lambda zone, dc: loc.priority(zone, dc, "dc1")).snapshot
    cla = cluster_load_assignment(snap, overprovisioning_factor=125)
    assert cla.policy.overprovisioning_factor.value == 125
    got = [
        (le.priority, le.locality.region, le.locality.zone, [lb.endpoint.hostname for lb in le.lb_endpoints])
        for le in cla.endpoints
    ]
    assert got == [(0, "dc1", "a", ["e1"]), (1, "dc1", "b", ["e2", "e3"]), (2, "dc2", "a", ["f1"])]
    # the relay reads the same priorities back from the same resource
    assert {m.instance_id: m.priority for m in members_of(cla)} == {"e1": 0, "e2": 1, "e3": 1, "f1": 2}
    # a priority is part of the content: moving an instance to another changes the version
    moved = build_snapshot(entries, "ernie", lambda zone, dc: 0).snapshot
    assert moved.version != snap.version


def test_relay_continues_on_the_nearest_priority_that_has_a_healthy_instance():
    async def run():
        m = Membership(stall_s=1.0)
        m.update(
            [
                Member("near", "10.0.0.1:1", True, 1),
                Member("far1", "10.0.0.2:1", True, 2),
                Member("far2", "10.0.0.3:1", True, 2),
                Member("nearest-draining", "10.0.0.4:1", False, 0),
            ]
        )
        picks = {m.pick(set(), key).instance_id for key in ("", "k1", "k2", "k3", "k4")}
        assert picks == {"near"}
        assert m.pick({"near"}).instance_id in {"far1", "far2"}  # spilled only when near was tried
        assert m.pick({"near"}, "k1").instance_id == m.pick({"near"}, "k1").instance_id  # affinity order holds

    asyncio.run(run())


def make_agent(tmp_path, **locality):
    cfg = finish(
        GatewayConfig(
            name="gw1",
            listen="0.0.0.0:8080",
            advertise_address="192.0.2.1",
            run_dir=str(tmp_path),
            locality=LocalitySettings(**locality),
        )
    )
    clock, ads = Clock(), FakeAds()
    agent = GatewayAgent(cfg, MemoryCatalog(), GatewayMetrics(), ads, FakeEnvoy(), clock=clock)
    agent.local_dc = "dc1"
    return agent, ads, clock


def test_a_remote_datacenter_that_stops_answering_keeps_its_instances_for_remote_keep_s_then_they_are_dropped(
    tmp_path,
):
    agent, ads, clock = make_agent(tmp_path, datacenters=("dc2",), remote_keep_s=60.0)
    local = [entry("e1", 8001)]
    remote = [entry("f1", 9001, dc="dc2"), entry("f2", 9002, dc="")]  # "": the watch's datacenter is said
    on_dc2 = agent.remote_watcher("dc2")
    agent.on_watch(WatchUpdate(tuple(local), clock()))
    on_dc2(WatchUpdate(tuple(remote), clock()))
    snap = ads.published[-1]
    assert {(e.instance_id, e.datacenter, e.priority) for e in snap.endpoints} == {
        ("e1", "dc1", 1),
        ("f1", "dc2", 2),
        ("f2", "dc2", 2),
    }
    # dc2 stops answering (a WAN partition, its servers down): the watch keeps the last content
    failing_at = clock()
    on_dc2(WatchUpdate(tuple(remote), failing_at, changed=False, failing_since=failing_at, last_error="timeout"))
    clock.t += 59.0
    agent.reconcile_once()
    assert ads.published[-1].ids() == {"e1", "f1", "f2"}
    assert "dc2 unreachable 59s (kept)" in agent.reconcile_once()
    clock.t += 1.0
    summary = agent.reconcile_once()
    assert ads.published[-1].ids() == {"e1"} and "dc2 dropped" in summary
    # the local datacenter's changes are published meanwhile, without dc2's
    agent.on_watch(WatchUpdate(tuple(local + [entry("e2", 8002)]), clock()))
    assert ads.published[-1].ids() == {"e1", "e2"}
    # dc2 answers again: its instances are back at once (even if its content did not change)
    on_dc2(WatchUpdate(tuple(remote), failing_at, changed=False))
    assert ads.published[-1].ids() == {"e1", "e2", "f1", "f2"}
    assert "dc2 ok" in agent.reconcile_once()


def test_the_local_grace_period_does_not_hold_a_remote_datacenters_instances(tmp_path):
    """After a local discontinuity (Consul restarted) absent local instances are held; a remote
    instance that left its own catalog is not (remote_keep_s is about its watch failing, not this)."""
    agent, ads, clock = make_agent(tmp_path, datacenters=("dc2",))
    on_dc2 = agent.remote_watcher("dc2")
    agent.on_watch(WatchUpdate((entry("e1", 8001),), clock()))
    on_dc2(WatchUpdate((entry("f1", 9001, dc="dc2"), entry("f2", 9002, dc="dc2")), clock()))
    agent.on_watch(WatchUpdate((), clock(), discontinuity_at=clock()))  # local Consul came back empty
    on_dc2(WatchUpdate((entry("f1", 9001, dc="dc2"),), clock(), discontinuity_at=clock()))
    assert ads.published[-1].ids() == {"e1", "f1"}  # e1 held, f2 gone


def test_a_watch_of_the_own_datacenter_as_a_remote_one_adds_nothing(tmp_path):
    """A shared config lists every datacenter; when the gateway could not ask its agent for its own
    at start, that one is watched as a remote too. Its instances are the local ones: merged twice,
    every snapshot was rejected (duplicate ids) and the gateway kept its old endpoints."""
    agent, ads, clock = make_agent(tmp_path, datacenters=("dc1", "dc2"))
    agent.local_dc = ""  # the agent lookup failed at start: learnt from the local watch below
    on_dc1, on_dc2 = agent.remote_watcher("dc1"), agent.remote_watcher("dc2")
    local = (entry("e1", 8001, dc="dc1"), entry("e2", 8002, dc="dc1"))
    on_dc1(WatchUpdate(local, clock()))
    agent.on_watch(WatchUpdate(local, clock()))
    on_dc2(WatchUpdate((entry("f1", 9001, dc="dc2"),), clock()))
    assert agent.local_dc == "dc1"
    assert ads.published[-1].ids() == {"e1", "e2", "f1"}
    assert "dc1" not in agent.datacenters_state()  # not reported as a remote datacenter either


def test_status_counts_instances_by_datacenter_and_zone_and_names_a_datacenter_that_did_not_answer():
    from agent.status import _instance_row, by_datacenter, render

    rows = [
        _instance_row(entry("e1", 8001, dc="dc1", zone="a"), {}),
        _instance_row(entry("e2", 8002, dc="dc1", zone="b", status=CheckStatus.CRITICAL), {}),
        _instance_row(entry("f1", 9001, dc="dc2", zone="a"), {}),
    ]
    dcs = by_datacenter(rows, {"dc1": "", "dc2": "", "dc3": "watch ernie: Consul unreachable"})
    assert dcs["dc1"] == {
        "instances": 2,
        "passing": 1,
        "zones": {"a": {"instances": 1, "passing": 1}, "b": {"instances": 1, "passing": 0}},
        "error": "",
    }
    assert (dcs["dc2"]["passing"], dcs["dc3"]["instances"], dcs["dc3"]["error"]) == (
        1,
        0,
        "watch ernie: Consul unreachable",
    )
    report = {"service": "ernie", "consul": "c", "passing": 2, "instances": rows, "gateways": [], "datacenters": dcs}
    text = render(report)
    assert "datacenter dc1: 1/2 passing (zones: a 1/1, b 0/1)" in text
    assert "datacenter dc3: not answering (watch ernie: Consul unreachable)" in text
    assert [line.split()[:2] for line in text.splitlines() if line.startswith("dc")] == [
        ["dc1", "a"],
        ["dc1", "b"],
        ["dc2", "a"],
    ]
