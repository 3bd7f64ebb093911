"""Two Consul datacenters, WAN-joined (real `consul agent` servers and clients in network
namespaces, bench/netns_multidc.py), simulated engines in both, a gateway in dc1 watching dc2 too
([locality] datacenters = ["dc2"]), under steady load (bench/load.py). Counted as a user sees it:
failed and truncated requests, seconds until the traffic moved. One lab for the module.

Needs root and iproute2 (and dig): without them the tests fail and say why, never skip.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.engines import sim_settings
from bench.load import LoadConfig, LoadGenerator
from bench.netns import available
from tests.integration.gateway_support import wait_until

ENGINES_PER_DC = 2
CONCURRENCY = 6
MAX_TOKENS = 48  # 20 ms a token: ~1 s streams, so some are in flight at every fault
SHIFT_BOUND_S = 5.0
REMOTE_KEEP_S = 3.0
REMOTE_WATCH_WAIT_S = 2.0
FILTERS = Path(__file__).resolve().parents[2] / "deploy" / "ansible" / "filter_plugins" / "ernie.py"
FIGURES: dict[str, float] = {}


def _prepared_query(datacenter: str) -> dict:
    """The prepared query as Ansible creates it (its filter, loaded as Ansible does: by path)."""
    spec = importlib.util.spec_from_file_location("ernie_filter_ernie", FILTERS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ernie_prepared_query("ernie", datacenter, ["dc1", "dc2"])


@pytest.fixture(scope="module")
def dcs(tmp_path_factory):
    why = available()
    if why:
        pytest.fail(f"network namespaces unavailable (the two-datacenter test needs root and iproute2): {why}")
    assert shutil.which("dig"), "dig (Debian dnsutils) is needed: scripts/install.sh system"
    from bench.netns_multidc import TwoDatacenters

    system = TwoDatacenters(
        sim_settings(),
        ENGINES_PER_DC,
        tmp_path_factory.mktemp("multidc"),
        locality={"remote_keep_s": REMOTE_KEEP_S, "remote_watch_wait_s": REMOTE_WATCH_WAIT_S},
    )
    try:
        system.start()
        for dc in ("dc1", "dc2"):
            system.put_prepared_query(dc, _prepared_query(dc))
        try:
            wait_until(
                lambda: all(len(v) == ENGINES_PER_DC for v in system.routable().values()), 60, "4 engines in Envoy"
            )
        except AssertionError:
            raise AssertionError(system.log_tails()) from None
        yield system
    finally:
        system.stop()
        if FIGURES:
            print("multidc figures:", FIGURES)


def load(system) -> LoadGenerator:
    return LoadGenerator(LoadConfig(system.base_url, "sim-model", CONCURRENCY, max_tokens=MAX_TOKENS)).start()


def outcomes(gen: LoadGenerator) -> dict[str, int]:
    gen.stop(15)
    results = gen.snapshot()
    out = {"requests": len(results), "failed": 0, "truncated": 0}
    for r in results:
        if r.outcome != "ok":
            out[r.outcome] += 1
    return out


def not_ok(gen: LoadGenerator) -> list:
    return [(r.outcome, r.kind, r.error) for r in gen.snapshot() if r.outcome != "ok"][:5]


def wait_for_growth(system, dc: str, since: dict[str, int], timeout_s: float) -> float:
    """Seconds until `dc`'s engines got requests beyond `since` (Envoy's rq_total)."""
    t0 = time.monotonic()
    wait_until(lambda: system.requests_by_dc()[dc] > since[dc], timeout_s, f"requests in {dc}", interval_s=0.05)
    return time.monotonic() - t0


def quiet(system, dc: str, for_s: float, timeout_s: float) -> float:
    """Seconds until `dc`'s engines got no request for `for_s` (the traffic left it)."""
    t0 = time.monotonic()
    last, since = system.requests_by_dc()[dc], time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        time.sleep(0.1)
        now = system.requests_by_dc()[dc]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= for_s:
            return since - t0
    raise AssertionError(f"{dc} still got requests after {timeout_s:g}s")


def test_traffic_stays_in_the_gateways_datacenter_while_it_has_capacity(dcs):
    gen = load(dcs)
    try:
        before = dcs.requests_by_dc()
        gen_count = len(gen.snapshot())
        wait_until(lambda: len(gen.snapshot()) >= gen_count + 4 * CONCURRENCY, 30, "requests completed")
        after = dcs.requests_by_dc()
    finally:
        got = outcomes(gen)
    assert (got["failed"], got["truncated"]) == (0, 0), not_ok(gen)
    assert after["dc1"] - before["dc1"] >= 4 * CONCURRENCY and after["dc2"] == before["dc2"], (before, after)
    # `ernie-mesh status` asked of dc1 lists both datacenters' instances, by datacenter and zone
    out = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--json", "--consul", f"{dcs.address('c1')}:8500"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {dc: (d["passing"], sorted(d["zones"])) for dc, d in report["datacenters"].items()} == {
        "dc1": (ENGINES_PER_DC, ["dc1-a"]),
        "dc2": (ENGINES_PER_DC, ["dc2-a"]),
    }
    assert [g["datacenter"] for g in report["gateways"]] == ["dc1"]


def test_every_dc1_engine_killed_traffic_moves_to_dc2_nothing_fails_and_returns_when_they_are_back(dcs):
    gen = load(dcs)
    try:
        wait_until(lambda: len(gen.snapshot()) >= 2 * CONCURRENCY, 30, "load under way")
        before = dcs.requests_by_dc()
        t_kill = time.monotonic()
        dcs.kill_engines("dc1")
        shift_s = wait_for_growth(dcs, "dc2", before, 15)
        wait_until(lambda: not dcs.routable()["dc1"], 15, "dc1 out of Envoy's rotation", interval_s=0.05)
        out_s = time.monotonic() - t_kill
        # DNS users: once dc1's instances are critical (their TTL ran out), the prepared query
        # answers dc2's; the plain service name has nothing in dc1.
        wait_until(lambda: not dcs.passing("dc1"), 20, "no dc1 instance passing in Consul")
        dc2 = sorted(dcs.passing("dc2"))
        assert len(dc2) == ENGINES_PER_DC
        wait_until(lambda: dcs.dig("ernie.query.consul") == dc2, 10, "the prepared query answering dc2's instances")
        assert dcs.dig("ernie.service.consul") == []
        # dc1's engines back: the traffic returns to dc1 and leaves dc2
        during = dcs.requests_by_dc()
        t_back = time.monotonic()
        dcs.start_engines("dc1")
        wait_until(lambda: len(dcs.routable()["dc1"]) == ENGINES_PER_DC, 60, "dc1's engines in Envoy again")
        routable_s = time.monotonic() - t_back
        t_routable = time.monotonic()
        wait_for_growth(dcs, "dc1", during, 10)
        returned_s = time.monotonic() - t_routable
        left_s = quiet(dcs, "dc2", 1.0, 15)
    finally:
        got = outcomes(gen)
    FIGURES.update(
        shift_to_dc2_s=round(shift_s, 2),
        dc1_out_of_rotation_s=round(out_s, 2),
        dc1_back_routable_after_start_s=round(routable_s, 2),
        return_to_dc1_after_routable_s=round(returned_s, 2),
        dc2_quiet_after_routable_s=round(left_s, 2),
        kill_requests=got["requests"],
        kill_failed=got["failed"],
        kill_truncated=got["truncated"],
    )
    assert (got["failed"], got["truncated"]) == (0, 0), (not_ok(gen), FIGURES)
    assert shift_s <= SHIFT_BOUND_S, FIGURES


def test_a_wan_partition_leaves_dc1_serving_from_its_own_and_drops_dc2_after_remote_keep_s(dcs):
    wait_until(lambda: all(len(v) == ENGINES_PER_DC for v in dcs.routable().values()), 30, "4 engines in Envoy")
    gen = load(dcs)
    try:
        wait_until(lambda: len(gen.snapshot()) >= 2 * CONCURRENCY, 30, "load under way")
        before = dcs.requests_by_dc()
        t_cut = time.monotonic()
        dcs.partition()
        # the gateway's dc2 watch fails (within remote_watch_wait_s + the HTTP slack), dc2's last
        # instances are kept remote_keep_s more, then dropped
        dc2_seen = []  # dc2's request count in Envoy until its endpoints are dropped

        def dc2_dropped() -> bool:
            counts = dcs.requests_by_dc()
            if dcs.routable()["dc2"]:
                dc2_seen.append(counts["dc2"])
                return False
            return True

        wait_until(dc2_dropped, 30, "dc2 dropped from Envoy", interval_s=0.1)
        dropped_s = time.monotonic() - t_cut
        n = len(gen.snapshot())
        wait_until(lambda: len(gen.snapshot()) >= n + 2 * CONCURRENCY, 30, "dc1 serving during the partition")
        during = dcs.requests_by_dc()
        dcs.heal()
        t_heal = time.monotonic()
        wait_until(lambda: len(dcs.routable()["dc2"]) == ENGINES_PER_DC, 30, "dc2 back in Envoy")
        back_s = time.monotonic() - t_heal
    finally:
        if dcs.partitioned:
            dcs.heal()
        got = outcomes(gen)
    FIGURES.update(
        partition_dc2_dropped_s=round(dropped_s, 2),
        partition_dc2_back_after_heal_s=round(back_s, 2),
        partition_requests=got["requests"],
        partition_failed=got["failed"],
        partition_truncated=got["truncated"],
    )
    assert (got["failed"], got["truncated"]) == (0, 0), (not_ok(gen), FIGURES)
    # dc1 served it all: dc2 got nothing while it was kept (nor could it after: dropped)
    assert during["dc1"] > before["dc1"] and set(dc2_seen) <= {before["dc2"]}, (before, during, dc2_seen)
    assert dropped_s >= REMOTE_KEEP_S, FIGURES  # kept at least remote_keep_s after the cut
    assert "datacenter dc2 has not answered" in dcs.gateway_log()
