"""Issue 12's two drills that need hosts of their own (bench/netns_mesh.py: network namespaces,
real `consul agent` servers and clients, engine agents with simulated engines, gateway agents with
Envoy and relays), each once, briefly. Asserts what users see and what the control plane did, not
the figures (those are in docs/reliability.md). Needs root and iproute2: without them the tests
fail and say why (as the other netns test does), they are never skipped.
"""

from __future__ import annotations

import shutil

import pytest

from bench.drill import DrillOptions, run_drill
from bench.netns import available

CONCURRENCY = 8


@pytest.fixture(autouse=True)
def netns_available():
    why = available()
    if why:
        pytest.fail(f"network namespaces unavailable (the netns drills need root and iproute2): {why}")


def drill(tmp_path, scenario: str, **kw) -> dict:
    opts = DrillOptions(scenario, system="mesh", engines=3, engine="sim", concurrency=CONCURRENCY, **kw)
    [r] = run_drill(opts, workdir=tmp_path)
    assert r["system"] == "mesh" and r["requests"] > CONCURRENCY, r
    return r


def test_consul_leader_loss_loses_nothing_and_nothing_leaves_the_catalog_or_rotation(tmp_path):
    # The dead leader stays down until the two others elected a new one (at least hold_s), then starts again.
    r = drill(tmp_path, "consul-leader-loss", duration_s=8.0, hold_s=4.0, recover_wait_s=40.0)
    assert (r["failed"], r["truncated"]) == (0, 0), r["not_ok"]
    ll = r["leader_loss"]
    assert ll["new_leader"] is not None and ll["new_leader"] != ll["killed"], ll
    assert r["detect_s"] == ll["new_leader_s"] and r["detect_of"] == "a new Consul leader", r
    # read from a follower while there was no leader: every instance stayed, passing
    assert ll["left_the_catalog"] == [] and ll["fewest_passing_in_catalog"] == 3, ll
    # the gateway kept its snapshot while its catalog reads failed: Envoy routed to every engine throughout
    assert ll["gateway_samples"] > 0 and ll["gateway_samples_not_routing_every_engine"] == 0, ll
    assert r["recover_s"] is not None, r["events"]  # the killed server back, a leader, every instance passing


def test_gateway_host_loss_fails_only_what_was_in_flight_on_the_lost_gateway(tmp_path):
    assert shutil.which("dig"), "dig (Debian dnsutils) is needed: scripts/install.sh system"
    r = drill(tmp_path, "gateway-host-loss", duration_s=10.0, recover_wait_s=30.0)
    g = r["gateway_loss"]
    assert g["clients_on_lost_at_cut"] >= 1, g  # the cut took clients with it: the drill saw a move
    # every request that did not complete was in flight on the lost gateway at the cut
    assert g["other_not_ok"] == 0, (g, r["not_ok"])
    assert g["not_ok_on_survivor_only"] == 0, g
    assert (g["after_cut"]["failed"], g["after_cut"]["truncated"]) == (0, 0), (g, r["not_ok"])
    assert r["failed"] + r["truncated"] == g["in_flight_on_lost"]["failed"] + g["in_flight_on_lost"]["truncated"]
    # Consul's DNS stopped naming the lost gateway, and every client got answers from the other one
    assert r["detect_s"] is not None and r["recover_s"] is not None, r["events"]
