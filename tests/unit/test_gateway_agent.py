"""The gateway agent's control loop with an in-memory catalog and fake Envoy / ADS parts."""

from __future__ import annotations

from prometheus_client import generate_latest

from agent.catalog.base import CatalogEntry, CheckStatus, VerdictState
from agent.catalog.memory import MemoryCatalog
from agent.gateway.agent import GatewayAgent
from agent.gateway.config import GatewayConfig, finish
from agent.gateway.metrics import GatewayMetrics
from agent.gateway.watch import WatchUpdate


class FakeAdmin:
    def __init__(self):
        self.is_ready = True
        self.rq_total: dict[str, int] = {}

    def ready(self):
        return self.is_ready

    def clusters_hosts(self, wanted):
        # the same instances in the engine cluster and in a model's cluster: their requests add up
        base = {iid: {"rq_total": str(n // 2)} for iid, n in self.rq_total.items()}
        model = {iid: {"rq_total": str(n - n // 2)} for iid, n in self.rq_total.items()}
        relay = {"relay-0": {"rq_total": "1000"}}  # not an engine cluster: not counted
        return {c: h for c, h in (("ernie", base), ("ernie--m", model), ("ernie_relay", relay)) if wanted(c)}


class FakeEnvoy:
    def __init__(self):
        self.state = "running"
        self.pid = 4242
        self.admin = FakeAdmin()

    def ensure(self):
        return self.state


class FakeAds:
    def __init__(self):
        self.published = []

    def publish(self, snapshot, changed_at=None):
        self.published.append(snapshot)
        return True

    def streams(self):
        return []


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(tmp_path):
    cfg = finish(GatewayConfig(name="gw1", listen="0.0.0.0:8080", advertise_address="192.0.2.1", run_dir=str(tmp_path)))
    catalog, envoy, ads, clock, metrics = MemoryCatalog(), FakeEnvoy(), FakeAds(), Clock(), GatewayMetrics()
    agent = GatewayAgent(cfg, catalog, metrics, ads, envoy, clock=clock)
    return agent, catalog, envoy, ads, clock, metrics


def entry(iid, port, status=CheckStatus.PASSING):
    return CatalogEntry(iid, "n", "10.0.0.1", port, status)


def update(entries, seen_at, **state):
    """What the catalog watch hands the agent when the content changed."""
    return WatchUpdate(tuple(entries), seen_at, **state)


def test_registers_itself_with_meta_and_follows_envoy_readiness(tmp_path):
    agent, catalog, envoy, _ads, clock, _m = make(tmp_path)
    summary = agent.reconcile_once()
    assert "registration passing" in summary and "envoy pid 4242 running, ready" in summary
    reg = catalog.local_instances("ernie-gateway")["ernie-gateway-gw1"]
    assert reg.address == "192.0.2.1" and reg.port == 8080
    assert reg.meta["listen_url"] == "http://192.0.2.1:8080"
    assert reg.meta["metrics_url"] == "http://127.0.0.1:9102/metrics"
    assert reg.meta["envoy_admin"] == "http://127.0.0.1:9901"
    assert catalog.verdict("ernie-gateway-gw1").state is VerdictState.PASSING
    envoy.admin.is_ready = False
    assert "registration critical" in agent.reconcile_once()
    assert catalog.verdict("ernie-gateway-gw1").state is VerdictState.CRITICAL
    envoy.state, envoy.admin.is_ready = "restarting in 1.0s", True
    agent.reconcile_once()
    assert catalog.verdict("ernie-gateway-gw1").reason == "envoy restarting in 1.0s"


def test_ttl_is_refreshed_and_a_lost_registration_comes_back(tmp_path):
    agent, catalog, _envoy, _ads, clock, _m = make(tmp_path)
    agent.reconcile_once()
    writes = len(catalog.writes)
    agent.reconcile_once()
    assert len(catalog.writes) == writes  # nothing changed, TTL not due
    clock.t += agent.cfg.ttl_s / 3 + 0.1
    agent.reconcile_once()
    assert catalog.writes[-1] == ("verdict", "ernie-gateway-gw1")
    catalog.forget_everything()  # Consul restarted
    clock.t += agent.cfg.ttl_s
    assert "registration passing" in agent.reconcile_once()
    assert catalog.writes[-1] == ("register", "ernie-gateway-gw1")


def test_consul_outage_does_not_break_the_loop(tmp_path):
    agent, catalog, _envoy, _ads, clock, _m = make(tmp_path)
    catalog.available = False
    assert "registration failing" in agent.reconcile_once()
    catalog.available = True
    clock.t += 1
    assert "registration passing" in agent.reconcile_once()


def test_catalog_changes_publish_new_versions_only(tmp_path):
    agent, _catalog, _envoy, ads, _clock, metrics = make(tmp_path)
    agent.on_watch(update([entry("a", 8001), entry("b", 8002, CheckStatus.WARNING)], seen_at=0.0))
    agent.on_watch(update([entry("b", 8002, CheckStatus.WARNING), entry("a", 8001)], seen_at=0.0))  # same content
    assert len(ads.published) == 1
    agent.on_watch(update([entry("a", 8001), entry("bad", 0)], seen_at=0.0))
    assert len(ads.published) == 2 and [e.instance_id for e in ads.published[-1].endpoints] == ["a"]
    text = metrics.registry.get_sample_value
    assert text("ernie_gateway_endpoints", {"state": "healthy"}) == 1
    assert text("ernie_gateway_endpoints", {"state": "draining"}) == 0
    assert text("ernie_gateway_snapshot_generation") == 2
    assert text("ernie_gateway_snapshot_rejected_endpoints") == 1
    assert text("ernie_gateway_snapshot_version_info", {"version": ads.published[-1].version}) == 1
    assert text("ernie_gateway_snapshot_version_info", {"version": ads.published[0].version}) is None


def test_reconcile_errors_are_survived(tmp_path, caplog):
    agent, _catalog, envoy, _ads, _clock, _m = make(tmp_path)
    calls = []

    def boom():
        calls.append(1)
        if len(calls) == 2:
            agent.stop_event.set()
        raise RuntimeError("bug")

    envoy.ensure = boom
    agent.cfg = finish(GatewayConfig(name="gw1", run_dir=str(tmp_path), reconcile_interval_s=0.01, ttl_s=1))
    agent.run()
    assert len(calls) == 2 and "reconcile failed" in caplog.text


def test_absent_instances_are_held_for_a_grace_period_after_a_consul_reset(tmp_path):
    agent, _catalog, _envoy, ads, clock, _m = make(tmp_path)
    agent.on_watch(update([entry("a", 8001), entry("b", 8002)], seen_at=clock()))
    # an ordinary removal (no discontinuity) is published at once
    agent.on_watch(update([entry("a", 8001)], seen_at=clock()))
    assert ads.published[-1].ids() == {"a"}
    agent.on_watch(update([entry("a", 8001), entry("b", 8002)], seen_at=clock()))
    # Consul came back empty: nothing is dropped during the grace period...
    reset_at = clock()
    agent.on_watch(update([], seen_at=clock(), discontinuity_at=reset_at))
    assert ads.published[-1].ids() == {"a", "b"}
    # ...an instance that says critical is removed, one that re-registered is current
    agent.on_watch(update([entry("a", 8001, CheckStatus.CRITICAL)], seen_at=clock(), discontinuity_at=reset_at))
    assert ads.published[-1].ids() == {"b"}
    clock.t += 5
    agent.reconcile_once()
    assert ads.published[-1].ids() == {"b"} and "(1 held)" in agent.reconcile_once()
    # after the grace period the catalog is the truth again
    clock.t += agent.cfg.catalog_reset_grace_s
    assert "held" not in agent.reconcile_once()
    assert ads.published[-1].ids() == frozenset()


def test_the_watch_state_reaches_the_summary_without_a_reference_to_the_watch(tmp_path):
    agent, _catalog, _envoy, ads, clock, _m = make(tmp_path)
    agent.on_watch(update([entry("a", 8001)], seen_at=clock()))
    assert "consul ok" in agent.reconcile_once()
    seen = ads.published[-1]
    # a state-only update (Consul failing) publishes nothing; the summary says why
    agent.on_watch(
        WatchUpdate(
            (entry("a", 8001),),
            clock(),
            changed=False,
            failing_since=clock(),
            last_error="Consul unreachable: Connection refused",
        )
    )
    assert ads.published[-1] is seen
    assert "consul unreachable (Connection refused)" in agent.reconcile_once()
    agent.on_watch(WatchUpdate((entry("a", 8001),), clock(), changed=False, discontinuity_at=clock()))
    assert "consul ok" in agent.reconcile_once() and ads.published[-1] is seen


def test_each_instances_share_of_requests_is_a_metric_and_the_routing_mode_is_registered(tmp_path):
    agent, _catalog, envoy, _ads, clock, metrics = make(tmp_path)
    assert agent._registration.meta["routing"] == "affinity:system"
    envoy.admin.rq_total = {"e1": 10, "e2": 10}
    agent.reconcile_once()
    envoy.admin.rq_total = {"e1": 40, "e2": 20}
    clock.t += 1
    agent.reconcile_once()
    text = generate_latest(metrics.registry).decode()
    assert 'ernie_gateway_instance_share{instance_id="e1"} 0.75' in text
    assert 'ernie_gateway_routing_info{key="system",mode="affinity"} 1.0' in text
    envoy.admin.rq_total = {"e2": 30}  # e1 left
    agent.reconcile_once()
    assert 'instance_id="e1"' not in generate_latest(metrics.registry).decode()


def test_an_instance_much_slower_than_the_fleet_gets_a_smaller_weight(tmp_path):
    """The gateway reads the engine agents' canary latencies (their /instances, real HTTP servers
    here) every speed_poll_s; after 3 agreeing readings the slow instance's weight drops and a
    snapshot with it is published (Envoy's load_balancing_weight, agent/gateway/eds.py). An agent
    that stops answering, or answers nonsense, changes nothing: its instance keeps its weight."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from agent.gateway.eds import cluster_load_assignment

    latency = {"e1": 30.0, "e2": 32.0, "e3": 95.0}
    reply = {"e3": None}  # None: answer normally; else (status, body) for e3's agent

    def agent_server(ids):
        class Agent(BaseHTTPRequestHandler):
            def do_GET(self):
                status, body = 200, json.dumps({"instances": [{"id": i, "canary_latency_ms": latency[i]} for i in ids]})
                if "e3" in ids and reply["e3"] is not None:
                    status, body = reply["e3"]
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Agent)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    fast, fast_url = agent_server(["e1", "e2"])
    slow, slow_url = agent_server(["e3"])
    try:
        agent, _catalog, _envoy, ads, clock, metrics = make(tmp_path)
        entries = [
            CatalogEntry(i, "n", "10.0.0.1", 8000 + k, CheckStatus.PASSING, meta={"agent_url": url})
            for k, (i, url) in enumerate([("e1", fast_url), ("e2", fast_url), ("e3", slow_url)])
        ]
        agent.on_watch(update(entries, clock()))

        def poll():
            agent.reconcile_once()
            agent._speed_poll.result(5)
            clock.t += agent.cfg.routing.speed_poll_s

        for _ in range(3):
            poll()
        weights = {e.instance_id: e.weight for e in ads.published[-1].endpoints}
        assert weights == {"e1": 100, "e2": 100, "e3": 25}
        cla = cluster_load_assignment(ads.published[-1])
        assert [lb.load_balancing_weight.value for lb in cla.endpoints[0].lb_endpoints] == [100, 100, 25]
        assert 'ernie_gateway_instance_weight{instance_id="e3"} 25.0' in generate_latest(metrics.registry).decode()
        published = len(ads.published)
        for broken in ((500, "oops"), (200, '{"instances": 5}'), (200, "not json")):
            reply["e3"] = broken
            poll()
            assert len(ads.published) == published, broken  # nothing republished
            assert agent._speeds.weight("e3") == 25, broken
    finally:
        fast.shutdown()
        slow.shutdown()
