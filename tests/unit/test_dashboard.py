"""The dashboard's pieces without a mesh: its config (bad values: one line), the snapshot built from
Prometheus answers (a fake Prometheus API), the charts on one time grid, `top`'s table, the server's
loopback Host guard, and `up`'s plan (port, URLs, Prometheus required with the dashboard)."""

from __future__ import annotations

import json
import urllib.parse

import httpx
import pytest

from agent.config import ConfigError
from agent.dashboard import queries
from agent.dashboard.config import DashboardConfig
from agent.dashboard.prom import Prometheus
from agent.dashboard.snapshot import Sources, charts, snapshot
from agent.dashboard.top import render
from agent.local.plan import MeshPlan

A, B = "ernie-n1-127.0.0.1-8001", "ernie-n1-127.0.0.1-8002"


def fake_prometheus(answers: dict[str, list[tuple[dict, float]]], ranges: dict[str, list] | None = None) -> Prometheus:
    """A Prometheus whose instant queries answer `answers[expr]` (else nothing), range queries `ranges[expr]`."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(urllib.parse.parse_qsl(request.url.query.decode()))
        expr = params.get("query", "")
        seen.append(expr)
        if request.url.path.endswith("/query"):
            result = [{"metric": m, "value": [0, str(v)]} for m, v in answers.get(expr, [])]
            return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": result}})
        result = [{"metric": m, "values": vals} for m, vals in (ranges or {}).get(expr, [])]
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix", "result": result}})

    prom = Prometheus("http://prom.test:9090", client=httpx.Client(transport=httpx.MockTransport(handler)))
    prom.seen = seen  # type: ignore[attr-defined]
    return prom


def test_config_refuses_bad_values_in_one_line():
    for kw in ({"prometheus": "prom:9090"}, {"listen": "127.0.0.1"}, {"refresh_s": 0.1}, {"consul": "a:b:c"}):
        with pytest.raises(ConfigError):
            DashboardConfig(**kw)
    assert DashboardConfig().on_loopback and not DashboardConfig(listen="0.0.0.0:8090").on_loopback


def test_snapshot_from_prometheus_alone_sorts_the_worst_verdict_first():
    prom = fake_prometheus(
        {
            queries.VERDICT: [
                ({"instance_id": A, "state": "passing", "node": "n1"}, 1),
                ({"instance_id": B, "state": "critical", "node": "n1"}, 1),
            ],
            queries.INSTANCE["tokens_s"]: [({"instance_id": A}, 42.5)],
            queries.INSTANCE["memory_bytes"]: [({"instance_id": A}, 3e8), ({"instance_id": B}, 1e8)],
            queries.INSTANCE["ttft_p50_s"]: [({"instance_id": A}, float("nan"))],  # no request in the window
            queries.GATEWAY["envoy_up"]: [({"gateway": "gw1"}, 1)],
            queries.TARGETS_FOUND: [({"job": "ernie-vllm"}, 2)],
            queries.TARGETS_UP: [({"job": "ernie-vllm"}, 1)],
        }
    )
    snap = snapshot(Sources(prom))
    assert [r["id"] for r in snap["instances"]] == [B, A]  # critical first
    a = snap["instances"][1]
    assert a["verdict"] == "passing" and a["tokens_s"] == 42.5 and a["memory_bytes"] == 3e8
    assert a["ttft_p50_s"] is None and a["gpu_utilization"] is None  # NaN and absent: no figure
    assert snap["passing"] == 1 and snap["consul"] is None and snap["prometheus"]["up"]
    assert snap["gateways"] == [
        {"id": "gw1", "status": "", "note": "", **dict.fromkeys(queries.GATEWAY), "envoy_up": 1}
    ]
    assert snap["targets"] == {"ernie-vllm": {"up": 1, "found": 2}}
    json.dumps(snap)  # what the page gets


def test_snapshot_says_when_prometheus_is_unreachable():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused")

    prom = Prometheus("http://127.0.0.1:1", client=httpx.Client(transport=httpx.MockTransport(refuse)))
    snap = snapshot(Sources(prom))
    assert not snap["prometheus"]["up"] and "unreachable" in snap["prometheus"]["error"]
    assert snap["instances"] == []
    text = render(snap)
    assert "Prometheus ERROR" in text and "(no instance registered)" in text


def test_charts_share_one_time_grid_with_gaps_where_a_series_has_no_sample():
    now = 10_000.0
    cpu = queries.INSTANCE["cpu_cores"]
    prom = fake_prometheus({}, {cpu: [({"instance_id": A}, [[now - 10, "0.5"], [now, "0.25"]])]})
    out = charts(prom, minutes=1, step_s=5, now=now)
    assert out["x"][0] == now - 60 and out["x"][-1] == now and len(out["x"]) == 13
    by_id = {c["id"]: c for c in out["charts"]}
    assert [c.id for c in queries.CHARTS] == list(by_id)
    (series,) = by_id["cpu"]["series"]
    assert series["label"] == A and series["values"][-3:] == [0.5, None, 0.25]
    assert by_id["gpu"]["optional"] and by_id["gpu"]["series"] == []


def test_top_renders_one_row_per_instance_with_the_verdict_in_colour():
    snap = {
        "time": 0,
        "prometheus": {"up": True, "error": ""},
        "consul": {"leader": "127.0.0.1:8300", "error": ""},
        "passing": 1,
        "instances": [
            {
                **dict.fromkeys(queries.INSTANCE),
                "id": A,
                "verdict": "critical",
                "reason": "engine process exited with code -9",
                "running": 0.0,
                "waiting": 2.0,
                "ttft_p50_s": 0.031,
                "memory_bytes": 3 * 2**20,
            }
        ],
        "gateways": [],
    }
    plain = render(snap)
    row = next(line for line in plain.splitlines() if line.startswith(A))
    assert row.split()[1:5] == ["critical", "0/2", "-", "31ms"] and "3.0MiB" in row and row.endswith("code -9")
    assert "\x1b[1;31mcritical" in render(snap, color=True) and "Consul leader 127.0.0.1:8300" in plain


def test_the_server_answers_loopback_names_only():
    from fastapi.testclient import TestClient

    from agent.dashboard.server import create_app

    app = create_app(DashboardConfig(), prom=fake_prometheus({}))
    client = TestClient(app, base_url="http://127.0.0.1:8090")
    assert client.get("/api/config").json()["prometheus"] == "http://127.0.0.1:9090"
    assert client.get("/").status_code == 200 and "uPlot.iife.min.js" in client.get("/").text
    assert client.get("/api/snapshot").json()["instances"] == []
    assert client.get("/api/charts?minutes=0").status_code == 400
    rebinding = client.get("/api/snapshot", headers={"Host": "evil.example:8090"})
    assert rebinding.status_code == 403
    wide = TestClient(create_app(DashboardConfig(listen="0.0.0.0:8090"), prom=fake_prometheus({})))
    assert wide.get("/api/config", headers={"Host": "dash.example"}).status_code == 200


def test_up_plans_the_dashboard_and_prometheus_with_it(tmp_path):
    plan = MeshPlan(run_dir=tmp_path, port_offset=100)
    assert plan.dashboard and plan.dashboard_url == "http://127.0.0.1:8190"
    assert ("127.0.0.1", "dashboard", 8190) in plan.ports() and ("127.0.0.1", "Prometheus", 9190) in plan.ports()
    cmd = plan.dashboard_command()
    assert cmd[-2:] == ["--listen", "127.0.0.1:8190"] and "http://127.0.0.1:9190" in cmd
    assert plan.urls()["dashboard"] == "http://127.0.0.1:8190"
    assert "--prometheus http://127.0.0.1:9190 --consul 127.0.0.1:8600" in plan.top_command()
    off = MeshPlan(run_dir=tmp_path, prometheus=False)
    assert not off.dashboard and "dashboard" not in off.urls()  # it reads Prometheus: none without it
    assert MeshPlan(run_dir=tmp_path).top_command() == "ernie-mesh top"


def test_the_verdict_watch_keeps_a_crash_that_lasted_a_second():
    """A killed engine is critical for about a second, then starting: the watch keeps the critical
    verdict (reason, when) for keep_s after it was last seen, and the snapshot carries it."""
    from types import SimpleNamespace

    from agent.catalog.base import Verdict, VerdictState
    from agent.dashboard.incidents import VerdictWatch

    def entry(state: VerdictState, reason: str) -> SimpleNamespace:
        return SimpleNamespace(instance_id=A, verdict=Verdict(state, reason))

    watch = VerdictWatch("127.0.0.1:1", "ernie", keep_s=60)
    watch.observe([entry(VerdictState.PASSING, "canary generation ok")], now=100)
    assert watch.recent(now=100) == {}
    watch.observe([entry(VerdictState.CRITICAL, "engine process exited with code -9")], now=101)
    watch.observe([entry(VerdictState.STARTING, "loading model")], now=102)
    assert watch.recent(now=110) == {A: {"reason": "engine process exited with code -9", "at": 101, "ago_s": 9.0}}
    assert watch.recent(now=162) == {}  # passing again for a while: no longer shown
    watch.observe([entry(VerdictState.CRITICAL, "engine process exited with code -9")])  # now
    prom = fake_prometheus({queries.VERDICT: [({"instance_id": A, "state": "starting"}, 1)]})
    (row,) = snapshot(Sources(prom, watch=watch))["instances"]
    assert row["verdict"] == "starting" and row["last_critical"]["reason"].endswith("code -9")
