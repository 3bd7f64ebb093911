"""Observability (issue 5): a real Prometheus finds the whole mesh through Consul and its rules and
dashboard queries work against it.

Real Consul (own dev agent), two engine agents supervising three SIMULATED engines, a gateway agent
with its Envoy, and Prometheus (a Debian build with Consul SD) scraping and evaluating every second.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from agent.engine.metrics import EngineAgentMetrics
from agent.gateway.metrics import GatewayMetrics
from agent.gateway.relay.metrics import RelayMetrics
from agent.local.consul_dev import ConsulDev
from agent.local.ports import free_ports
from agent.local.prometheus import (
    JOB_ENGINE_AGENT,
    JOB_ENVOY,
    JOB_GATEWAY_AGENT,
    JOB_VLLM,
    render_config,
    write_config,
)
from agent.local.prometheus_rules import ALERTS, RECORDS, render_rules
from agent.local.wait import wait_until
from tests.integration.engine_support import EngineAgent
from tests.integration.prometheus_support import (
    REPO,
    GatewayAgent,
    Prometheus,
    chat,
    dashboard_queries,
    finite_values,
    prometheus_binaries,
    promtool,
)

pytestmark = pytest.mark.timeout(420)

SERVICE = "ernie"
MODEL = "sim-model"
ALERT_FOR_S = 2.0  # every alert's `for:` in this test (the real rule says 1m for ErnieInstanceCritical)
RESTART_BACKOFF_S = 20.0  # the killed engine stays dead this long before its agent restarts it
RATE_INTERVAL = "2m"  # what Grafana's $__rate_interval becomes here (covers the whole test run)
DISCOVERY_TIMEOUT_S = 60.0  # Consul SD refresh + Prometheus' 5 s target-update throttling, twice over
PROM_TIMEOUT_S = 45.0


@dataclass
class Mesh:
    consul: ConsulDev
    agents: list[EngineAgent]
    instances: dict[str, tuple[EngineAgent, int]]  # instance ID -> (its agent, engine port)
    gateway: GatewayAgent
    prom: Prometheus
    incident: dict | None = field(default=None)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observability")
    (tmp / "consul").mkdir()
    with ExitStack() as stack:
        consul = stack.enter_context(ConsulDev(node="obs-consul", data_dir=str(tmp / "consul")))
        ports = free_ports(3)
        layout = (("obs-a", "zone-a", ports[:2]), ("obs-b", "zone-b", ports[2:]))
        agents, instances = [], {}
        for node, zone, engine_ports in layout:
            agent_dir = tmp / node
            agent_dir.mkdir()
            agent = EngineAgent(
                agent_dir,
                consul.address,
                SERVICE,
                node=node,
                zone=zone,
                restart_backoff_initial_s=RESTART_BACKOFF_S,
                engines=[{"kind": "simulated", "port": p, "served_model_name": MODEL} for p in engine_ports],
            )
            stack.enter_context(agent)
            agents.append(agent)
            instances.update({agent.instance_id(p): (agent, p) for p in engine_ports})
        for iid, (agent, _port) in instances.items():
            agent.wait_state(iid, "passing", timeout_s=60)
        gateway = GatewayAgent(tmp, consul.address, SERVICE, "obs-gw")
        stack.callback(gateway.stop)
        gateway.start(healthy_endpoints=len(instances))
        prom = stack.enter_context(
            Prometheus(tmp / "prometheus", consul.address, interval_s=1.0, alert_for_s=ALERT_FOR_S)
        )
        yield Mesh(consul, agents, instances, gateway, prom)


def _wait(what: str, predicate, timeout_s: float = PROM_TIMEOUT_S, detail=lambda: ""):
    try:
        return wait_until(predicate, timeout_s, interval_s=0.25, what=what)
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{detail()}") from None


def _value(prom: Prometheus, expr: str) -> float | None:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if result else None


# --- configs -----------------------------------------------------------------------------------------


def test_configs_are_rendered_and_promtool_accepts_them(tmp_path):
    _prometheus, tool = prometheus_binaries()
    deploy = REPO / "deploy" / "prometheus"
    # The checked-in files are what the renderer produces (edit the Python, re-render).
    assert (deploy / "prometheus.yml").read_text() == render_config(), "re-run deploy/prometheus/render.py"
    assert (deploy / "rules" / "ernie-mesh.rules.yml").read_text() == render_rules(), (
        "re-run deploy/prometheus/render.py"
    )
    r = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "grafana" / "dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    # promtool: the checked-in config (with its rule file) and one rendered for another Consul.
    for args in (
        ("check", "config", str(deploy / "prometheus.yml")),
        ("check", "rules", str(deploy / "rules" / "ernie-mesh.rules.yml")),
        (
            "check",
            "config",
            str(write_config(tmp_path, "10.1.2.3:8500", scrape_interval_s=1.0, alert_for_s=ALERT_FOR_S)),
        ),
    ):
        r = promtool(tool, *args)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    assert f"SUCCESS: {len(RECORDS) + len(ALERTS)} rules found" in r.stdout
    rendered = (tmp_path / "prometheus.yml").read_text()
    assert 'server: "10.1.2.3:8500"' in rendered and "static_configs" not in rendered


def _our_metrics() -> list:
    """(name as exposed, type, label names) of every metric the engine and gateway agents (and the
    gateway's relay processes) define."""
    out = []
    for holder in (EngineAgentMetrics(), GatewayMetrics(), RelayMetrics(CollectorRegistry())):
        for m in vars(holder).values():
            if hasattr(m, "_labelnames") and hasattr(m, "_type"):
                exposed = m._name + "_total" if m._type == "counter" else m._name
                out.append((exposed, m._type, tuple(m._labelnames)))
    return out


def test_metric_names_follow_conventions_and_are_documented():
    docs = (REPO / "docs" / "metrics.md").read_text()
    ours = _our_metrics()
    assert len(ours) >= 20
    for name, kind, labels in ours:
        assert re.fullmatch(r"ernie_(engine|gateway)_[a-z][a-z0-9_]*", name), name
        assert f"`{name}`" in docs, f"{name} is not documented in docs/metrics.md"
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        if kind == "histogram" or "duration" in name or "latency" in name or "timestamp" in name:
            assert name.endswith("_seconds"), f"{name}: a time in base units (_seconds)"
        if name.endswith("_info"):
            assert kind == "gauge", name
        assert not {"job", "le", "quantile"} & set(labels), (name, labels)
        assert not any(lbl.startswith("__") for lbl in labels), (name, labels)
        # `instance` collides with Prometheus' target label: tolerated only because the config
        # renames the exported one to instance_id (see docs/metrics.md, Labels).
        if "instance" in labels:
            assert name.startswith("ernie_engine_") and "exported_instance" in render_config(), name
    # Every series the dashboard and the rules read is documented.
    from agent.dashboard import queries as live  # the dashboard page's and `ernie-mesh top`'s

    exprs = [e for _t, e in dashboard_queries()] + [r.expr for r in RECORDS] + [a.expr for a in ALERTS]
    exprs += [*live.INSTANCE.values(), *live.GATEWAY.values(), *(ln.expr for c in live.CHARTS for ln in c.lines)]
    used = set()
    for expr in exprs:
        expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
        expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
        used |= {
            re.sub(r"_(bucket|count|sum)$", "", n)
            for n in re.findall(r"\b(?:ernie_|ernie:|vllm:|envoy_)[A-Za-z0-9_:]*", expr)
        }
    undocumented = sorted(n for n in used if f"`{n}`" not in docs)
    assert undocumented == [], f"used by the dashboards or rules but not in docs/metrics.md: {undocumented}"


# --- discovery -------------------------------------------------------------------------------------


def test_every_job_discovered_through_consul_is_up(mesh):
    expected = {JOB_ENGINE_AGENT: len(mesh.agents), JOB_VLLM: len(mesh.instances), JOB_GATEWAY_AGENT: 1, JOB_ENVOY: 1}

    def by_job() -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for t in mesh.prom.targets():
            out.setdefault(t["labels"]["job"], []).append(t)
        return out

    def all_up():
        jobs = by_job()
        counts = {j: sum(1 for t in ts if t["health"] == "up") for j, ts in jobs.items()}
        return jobs if counts == expected else None

    t0 = time.monotonic()
    jobs = _wait(
        "every job discovered via Consul and up",
        all_up,
        DISCOVERY_TIMEOUT_S,
        lambda: "\n".join(
            f"{t['labels']} {t['scrapeUrl']} {t['health']} {t['lastError']}" for ts in by_job().values() for t in ts
        ),
    )
    print(f"all {sum(expected.values())} targets up {time.monotonic() - t0:.1f}s after the first check")

    vllm = {t["labels"]["instance_id"]: t for t in jobs[JOB_VLLM]}
    assert sorted(vllm) == sorted(mesh.instances)
    for iid, t in vllm.items():
        agent, port = mesh.instances[iid]
        assert t["scrapeUrl"] == f"http://127.0.0.1:{port}/metrics"
        assert (t["labels"]["node"], t["labels"]["model"], t["labels"]["service"], t["labels"]["engine_kind"]) == (
            agent.node,
            MODEL,
            SERVICE,
            "simulated",
        )
        assert t["labels"]["zone"] == {"obs-a": "zone-a", "obs-b": "zone-b"}[agent.node]
    # One target per engine agent, however many instances it registers.
    agents = {t["scrapeUrl"]: t["labels"] for t in jobs[JOB_ENGINE_AGENT]}
    assert sorted(agents) == sorted(f"{a.url}/metrics" for a in mesh.agents)
    assert sorted((lbl["node"], lbl["zone"]) for lbl in agents.values()) == [("obs-a", "zone-a"), ("obs-b", "zone-b")]
    gw = mesh.gateway
    assert jobs[JOB_GATEWAY_AGENT][0]["scrapeUrl"] == f"http://127.0.0.1:{gw.metrics_port}/metrics"
    assert jobs[JOB_ENVOY][0]["scrapeUrl"] == f"http://127.0.0.1:{gw.admin_port}/stats/prometheus"
    assert {t["labels"]["gateway"] for t in jobs[JOB_GATEWAY_AGENT] + jobs[JOB_ENVOY]} == {"obs-gw"}

    # The engine agents' per-instance series are stored with instance_id (not exported_instance).
    def verdicts():
        result = mesh.prom.query('ernie_engine_verdict{state="passing"} == 1')
        return result if len(result) == len(mesh.instances) else None

    result = _wait("a passing verdict series per instance", verdicts)
    _wait(
        "the recorded count of passing instances",
        lambda: _value(mesh.prom, f'ernie:instances_passing:count{{model="{MODEL}"}}') == len(mesh.instances),
    )
    assert sorted(s["metric"]["instance_id"] for s in result) == sorted(mesh.instances)
    assert not any("exported_instance" in s["metric"] for s in result)


# --- a failure -------------------------------------------------------------------------------------


def _firing(prom: Prometheus, name: str, iid: str) -> list[dict]:
    return [
        a
        for a in prom.alerts()
        if a["labels"].get("alertname") == name and a["labels"].get("instance_id") == iid and a["state"] == "firing"
    ]


def run_incident(mesh: Mesh) -> dict:
    """SIGKILL one simulated engine; follow its target and alert until its agent has restarted it.
    Run once per module: the failover series it leaves behind are what later queries read."""
    if mesh.incident is not None:
        return mesh.incident
    prom = mesh.prom
    iid = sorted(mesh.instances)[0]
    agent, port = mesh.instances[iid]
    _wait(
        "the victim's target up",
        lambda: _value(prom, f'up{{job="{JOB_VLLM}",instance_id="{iid}"}}') == 1,
        DISCOVERY_TIMEOUT_S,
    )
    pid = agent.instances()[iid]["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    agent.wait_state(iid, "critical", timeout_s=15, cause="exited")
    t_critical = time.monotonic() - t0
    _wait("the killed engine's target down", lambda: _value(prom, f'up{{job="{JOB_VLLM}",instance_id="{iid}"}}') == 0)
    t_down = time.monotonic() - t0
    _wait(
        "ErnieInstanceCritical firing",
        lambda: _firing(prom, "ErnieInstanceCritical", iid),
        detail=lambda: f"alerts: {prom.alerts()}",
    )
    t_fire = time.monotonic() - t0
    others_up = _value(prom, f'count(up{{job="{JOB_VLLM}",instance_id!="{iid}"}} == 1)')
    passing = f'ernie:instances_passing:count{{service="{SERVICE}",model="{MODEL}"}}'
    _wait("the recorded count of passing instances one down", lambda: _value(prom, passing) == len(mesh.instances) - 1)
    no_healthy = [a for a in prom.alerts() if a["labels"]["alertname"] == "ErnieNoHealthyInstance"]
    # The agent restarts the engine after its backoff: the target comes back and the alert resolves.
    agent.wait_state(iid, "passing", timeout_s=RESTART_BACKOFF_S + 40)
    _wait("the restarted engine's target up", lambda: _value(prom, f'up{{job="{JOB_VLLM}",instance_id="{iid}"}}') == 1)
    _wait("ErnieInstanceCritical resolved", lambda: not _firing(prom, "ErnieInstanceCritical", iid))
    mesh.incident = {
        "instance": iid,
        "critical_s": t_critical,
        "down_s": t_down,
        "fire_s": t_fire,
        "recovered_s": time.monotonic() - t0,
        "others_up": others_up,
        "no_healthy": no_healthy,
    }
    return mesh.incident


def test_killed_engine_target_goes_down_and_instance_critical_alert_fires(mesh):
    inc = run_incident(mesh)
    print(
        f"{inc['instance']} SIGKILLed: critical in Consul after {inc['critical_s']:.1f}s, target down after "
        f"{inc['down_s']:.1f}s, ErnieInstanceCritical firing after {inc['fire_s']:.1f}s (for: {ALERT_FOR_S:g}s), "
        f"recovered after {inc['recovered_s']:.1f}s"
    )
    assert inc["down_s"] <= inc["fire_s"]
    assert inc["others_up"] == len(mesh.instances) - 1, "only the killed engine's target may go down"
    assert inc["no_healthy"] == [], "other instances stayed healthy: ErnieNoHealthyInstance must not fire"


# --- every query the dashboard and the rules use ---------------------------------------------------------

# Per-instance gateway figures come from Envoy's per-endpoint stats, which exist only when the
# engine cluster sets `track_cluster_stats: {per_endpoint_stats: true}` (envoy/bootstrap.yaml).
PER_ENDPOINT = "envoy_cluster_endpoint_"


def per_endpoint_stats_enabled() -> bool:
    return "per_endpoint_stats: true" in (REPO / "envoy" / "bootstrap.yaml").read_text()


def with_traffic(mesh: Mesh) -> None:
    """The failure (critical transitions, a restart, xDS pushes) and a few streamed requests to every
    engine directly and through the gateway (TTFT, inter-token, e2e, Envoy upstream times)."""
    run_incident(mesh)
    if mesh.incident.get("traffic"):
        return
    engines = [f"http://127.0.0.1:{port}" for _agent, port in mesh.instances.values()]
    for url in engines * 2 + [mesh.gateway.url] * 6:
        r = chat(url)
        assert r.status_code == 200, (url, r.status_code, r.text)
    mesh.incident["traffic"] = True


GPU_ONLY = "ernie_engine_gpu_"  # exported on GPU hosts only (no GPU here: tests/unit/test_engine_resources.py)


def all_queries() -> list[tuple[str, str]]:
    queries = [
        (f"dashboard: {title}", expr.replace("$__rate_interval", RATE_INTERVAL))
        for title, expr in dashboard_queries()
        if GPU_ONLY not in expr
    ]
    queries += [(f"record {r.record}", r.expr) for r in RECORDS]
    queries += [(f"alert {a.name} (signal)", a.signal) for a in ALERTS]
    return queries


def assert_all_return_data(prom: Prometheus, queries: list[tuple[str, str]]) -> None:
    empty: dict[str, str] = {}

    def all_have_data() -> bool:
        empty.clear()
        for what, expr in queries:
            result = prom.query(expr)  # raises on a query Prometheus cannot parse or evaluate
            if not finite_values(result):
                empty[what] = f"{expr}\n    -> {result[:3]}"
        return not empty

    _wait(
        f"all {len(queries)} queries returning a finite value",
        all_have_data,
        detail=lambda: "no data:\n" + "\n".join(f"  {k}: {v}" for k, v in empty.items()),
    )


def test_every_dashboard_and_rule_query_returns_data(mesh):
    with_traffic(mesh)
    queries = [(what, expr) for what, expr in all_queries() if PER_ENDPOINT not in expr]
    assert len(queries) >= 40
    assert_all_return_data(mesh.prom, queries)
    # The alert expressions themselves evaluate (their result is empty while nothing is wrong) ...
    for a in ALERTS:
        mesh.prom.query(a.expr)
    # ... and Prometheus loaded every rule and evaluates it without error.
    rules = mesh.prom.rules()
    assert sorted(r["name"] for r in rules) == sorted([r.record for r in RECORDS] + [a.name for a in ALERTS])
    assert [r for r in rules if r["health"] != "ok"] == []


def test_per_instance_gateway_queries_return_data(mesh):
    queries = [(what, expr) for what, expr in all_queries() if PER_ENDPOINT in expr]
    assert queries, "the dashboard shows requests and errors per instance as the gateways see them"
    assert per_endpoint_stats_enabled(), "envoy/bootstrap.yaml must keep track_cluster_stats.per_endpoint_stats"
    with_traffic(mesh)
    assert_all_return_data(mesh.prom, queries)
