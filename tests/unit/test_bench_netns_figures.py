"""The netns drills' figures (bench/scenarios.py) and their rows in docs/reliability.md
(bench/document.py, bench/run.py's --drills merge): pure functions over recorded outcomes."""

from __future__ import annotations

from bench import document
from bench.load import Result
from bench.run import merge_rows
from bench.scenarios import all_served_by, gateway_loss_figures

LOST, SURVIVOR = "10.0.0.13:8080", "10.0.0.14:8080"
CUT = 100.0


def res(worker: int, started: float, latency: float, servers: list[str], outcome: str = "ok", stream=False) -> Result:
    return Result(started, latency, stream, outcome, servers=servers, worker=worker)


def test_all_served_by_waits_for_every_client_and_takes_each_ones_first_answer():
    results = [
        res(0, CUT + 0.1, 0.5, [SURVIVOR]),  # client 0 answered at 100.6
        res(0, CUT + 1.0, 0.5, [SURVIVOR]),
        res(1, CUT - 1.0, 0.5, [SURVIVOR]),  # before the cut: does not count
        res(1, CUT + 0.2, 6.0, [LOST, SURVIVOR]),  # retried on the survivor: answered at 106.2
    ]
    assert all_served_by(results, SURVIVOR, CUT, workers=2) == CUT + 6.2
    assert all_served_by(results, SURVIVOR, CUT, workers=3) is None  # a client not served yet
    failed = [res(0, CUT + 0.1, 0.5, [SURVIVOR], outcome="failed")]
    assert all_served_by(failed, SURVIVOR, CUT, workers=1) is None


def test_gateway_loss_figures_tell_in_flight_on_the_lost_gateway_from_every_other_failure():
    results = [
        res(0, CUT - 2.0, 1.0, [LOST]),  # done before the cut
        res(0, CUT - 0.5, 5.5, [LOST], outcome="truncated", stream=True),  # in flight, cut
        res(1, CUT - 0.3, 6.0, [LOST, SURVIVOR]),  # in flight, completed by the SDK's retry
        res(2, CUT - 0.2, 0.5, [SURVIVOR]),  # in flight on the survivor
        res(2, CUT + 1.0, 0.5, [SURVIVOR], outcome="failed"),  # a failure on the survivor: not allowed
        res(0, CUT + 5.5, 0.5, [SURVIVOR]),
    ]
    g = gateway_loss_figures(results, CUT, LOST, SURVIVOR)
    assert g["clients_on_lost_at_cut"] == 2 and g["clients"] == 3
    assert g["in_flight_on_lost"] == {"requests": 2, "ok": 1, "failed": 0, "truncated": 1, "streams": 1}
    assert g["after_cut"]["requests"] == 2 and g["after_cut"]["failed"] == 1
    assert g["other_not_ok"] == 1 and g["not_ok_on_survivor_only"] == 1
    row = {"scenario": "gateway-host-loss", "recover_s": 6.2, "failed": 1, "truncated": 1, "gateway_loss": g}
    assert not document.goal_met(row)
    ok = gateway_loss_figures(results[:4] + results[5:], CUT, LOST, SURVIVOR)
    assert document.goal_met({**row, "failed": 0, "gateway_loss": ok})  # only the in-flight stream was lost


def test_drills_run_alone_replace_their_rows_and_keep_the_others():
    part = {"machine": {"date": "old"}, "rows": [{"scenario": "kill", "system": "mesh"}, {"scenario": "x"}]}
    merged = merge_rows(part, [{"scenario": "x", "system": "mesh", "requests": 5}])
    assert [r["scenario"] for r in merged["rows"]] == ["kill", "x"]
    assert merged["machine"] == {"date": "old"}  # the last full run's line stays
    assert merged["rows"][1]["requests"] == 5 and "machine" in merged["rows"][1]  # the new row has its own
    assert "machine" not in merged["rows"][0]


def test_a_run_without_network_namespaces_runs_every_other_drill(monkeypatch):
    import argparse

    import bench.netns
    import bench.run
    from bench.scenarios import NETNS, SCENARIOS

    monkeypatch.setattr(bench.netns, "available", lambda: "needs root (ip netns)")
    ran: list[str] = []
    monkeypatch.setattr(bench.run, "run_drill", lambda opts, stop: ran.append(opts.scenario) or [])
    bench.run.run_drills(argparse.Namespace(duration=1.0, concurrency=1, max_tokens=1), "sim")
    assert NETNS and set(ran) == set(SCENARIOS) - NETNS


def test_cluster_hosts_reads_each_hosts_stats_and_leaves_the_clusters_own_lines_out():
    from bench.netns_mesh import cluster_hosts

    text = (
        "ernie::observability_name::ernie\n"
        "ernie::default_priority::max_connections::1024\n"
        "ernie::outlier::success_rate_average::-1\n"
        "ernie::10.0.0.1:8001::rq_total::5\n"
        "ernie::10.0.0.1:8001::health_flags::healthy\n"
        "ernie::10.0.0.2:8001::health_flags::/failed_outlier_check\n"
        "ernie_relay::10.0.0.9:1::health_flags::healthy\n"
    )
    assert cluster_hosts(text) == {
        "10.0.0.1:8001": {"rq_total": "5", "health_flags": "healthy"},
        "10.0.0.2:8001": {"health_flags": "/failed_outlier_check"},
    }
