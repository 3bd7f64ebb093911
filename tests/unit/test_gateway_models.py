"""Several models: the snapshot's models and their cluster names, the models' clusters (CDS) copied
from the rendered bootstrap, the ADS server serving them with their endpoints, and the relay's
routing by model (pure; the whole path through Envoy: tests/integration/test_models.py)."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import json_format

from agent.catalog.base import CatalogEntry, CheckStatus
from agent.gateway import bootstrap
from agent.gateway.config import DEFAULT_BOOTSTRAP_TEMPLATE, GatewayConfig, finish
from agent.gateway.eds import CDS_TYPE_URL, EDS_TYPE_URL, cluster_load_assignment, model_clusters, model_of_cluster
from agent.gateway.relay.ads_client import members_of, models_of
from agent.gateway.relay.membership import Member, Membership
from agent.gateway.snapshot import Snapshot, build_snapshot, model_cluster_name, with_held
from agent.gateway.xds import AdsServer
from tests.unit.test_gateway_xds import FakeEnvoy, wait_for


def entry(iid: str, port: int, model: str, status: CheckStatus = CheckStatus.PASSING, **meta: str) -> CatalogEntry:
    return CatalogEntry(
        instance_id=iid,
        node="n1",
        address="127.0.0.1",
        port=port,
        status=status,
        meta={"model": "/models/x", "served_model_name": model, **meta},
    )


def two_models() -> Snapshot:
    return build_snapshot(
        [
            entry("a1", 8001, "alpha", max_model_len="4096"),
            entry("a2", 8002, "alpha", max_model_len="2048"),
            entry("b1", 8003, "beta"),
            entry("c1", 8004, "gamma", CheckStatus.CRITICAL),  # known, nothing routable
        ],
        "ernie",
    ).snapshot


# --- the snapshot ------------------------------------------------------------------------------


def test_models_are_every_registered_model_and_each_has_its_cluster():
    snap = two_models()
    assert snap.models == ("alpha", "beta", "gamma")  # gamma's instance is critical: known all the same
    assert snap.model_clusters() == {"ernie--alpha": "alpha", "ernie--beta": "beta", "ernie--gamma": "gamma"}
    assert [e.instance_id for e in snap.endpoints_of("ernie--alpha")] == ["a1", "a2"]
    assert [e.instance_id for e in snap.endpoints_of("ernie--gamma")] == []
    assert len(snap.endpoints_of("ernie")) == 3  # the engine cluster: every routable instance
    assert {e.instance_id: e.max_model_len for e in snap.endpoints} == {"a1": 4096, "a2": 2048, "b1": 0}
    # a new model (even with nothing routable yet) is a new version: its cluster must reach Envoy
    one_less = build_snapshot([entry("a1", 8001, "alpha"), entry("b1", 8003, "beta")], "ernie").snapshot
    assert one_less.models == ("alpha", "beta") and one_less.version != snap.version


def test_model_cluster_names_are_stat_safe_and_distinct():
    assert model_cluster_name("ernie", "sim-model") == "ernie--sim-model"
    odd = model_cluster_name("ernie", "baidu/ERNIE-4.5-0.3B-PT")
    assert odd.startswith("ernie--baidu_ERNIE-4_5-0_3B-PT-") and "." not in odd and "/" not in odd
    assert model_cluster_name("ernie", "a/b") != model_cluster_name("ernie", "a.b")  # a digest keeps them apart
    assert len(model_cluster_name("ernie", "x" * 300)) < 80


def test_held_endpoints_keep_their_models():
    snap = two_models()
    now = build_snapshot([entry("a1", 8001, "alpha")], "ernie").snapshot
    held = with_held(now, snap, frozenset({"b1"}))
    assert "beta" in held.models and [e.instance_id for e in held.endpoints_of("ernie--beta")] == ["b1"]


# --- CDS and EDS -------------------------------------------------------------------------------


def template() -> dict:
    cfg = finish(GatewayConfig(name="gw-test", run_dir="/tmp/unused", advertise_address="127.0.0.1"))
    return bootstrap.cluster_template(bootstrap.render(DEFAULT_BOOTSTRAP_TEMPLATE.read_text(), cfg), cfg.cluster)


def test_each_models_cluster_is_the_bootstraps_engine_cluster_with_its_name():
    tpl = template()
    clusters = model_clusters(two_models(), tpl)
    assert [c.name for c in clusters] == ["ernie--alpha", "ernie--beta", "ernie--gamma"]
    alpha = json_format.MessageToDict(clusters[0], preserving_proto_field_name=True)
    assert alpha["eds_cluster_config"]["service_name"] == "ernie--alpha"
    assert model_of_cluster(clusters[0]) == "alpha"
    # the same policy as the engine cluster: balancing and its load bound, ejection, circuit breakers
    base = cluster_pb2.Cluster()
    json_format.ParseDict(tpl, base)
    for field in ("lb_policy", "common_lb_config", "outlier_detection", "circuit_breakers", "connect_timeout"):
        assert getattr(clusters[0], field) == getattr(base, field), field
    assert alpha["lb_policy"] == "MAGLEV"
    assert alpha["common_lb_config"]["consistent_hashing_lb_config"]["hash_balance_factor"] == 150
    assert alpha["outlier_detection"]["consecutive_local_origin_failure"] == 3


def test_the_engines_credential_is_in_every_models_cluster(tmp_path):
    key = tmp_path / "engine.key"
    key.write_text("sk-engine\n")
    key.chmod(0o600)
    cfg = finish(
        GatewayConfig(
            name="gw-test", run_dir=str(tmp_path / "run"), advertise_address="127.0.0.1", engine_api_key_file=str(key)
        )
    )
    tpl = bootstrap.cluster_template(bootstrap.render(DEFAULT_BOOTSTRAP_TEMPLATE.read_text(), cfg), cfg.cluster)
    (alpha, *_) = model_clusters(two_models(), tpl)
    options = alpha.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert b"credential_injector" in options.value


def test_a_models_endpoints_are_its_instances_only():
    snap = two_models()
    cla = cluster_load_assignment(snap, cluster="ernie--alpha")
    assert cla.cluster_name == "ernie--alpha"
    assert [lb.endpoint.hostname for lb in cla.endpoints[0].lb_endpoints] == ["a1", "a2"]
    members = members_of(cluster_load_assignment(snap))  # what the relay reads from the engine cluster
    assert {m.instance_id: (m.model, m.max_model_len) for m in members} == {
        "a1": ("alpha", 4096),
        "a2": ("alpha", 2048),
        "b1": ("beta", 0),
    }


@pytest.fixture
def server():
    s = AdsServer("127.0.0.1:0", cluster_template=template()).start()
    yield s
    s.stop()


def send(envoy: FakeEnvoy, type_url: str, names=(), version="", nonce="", first=False) -> None:
    from envoy.service.discovery.v3 import discovery_pb2

    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url, version_info=version, response_nonce=nonce, resource_names=list(names)
    )
    if first:
        req.node.id = envoy.node
    envoy.requests.put(req)


def test_ads_serves_the_models_clusters_and_their_endpoints(server):
    server.publish(build_snapshot([entry("a1", 8001, "alpha")], "ernie").snapshot)
    envoy = FakeEnvoy(server.port)
    try:
        send(envoy, CDS_TYPE_URL, first=True)
        cds = envoy.recv()
        assert cds.type_url == CDS_TYPE_URL
        assert models_of([_unpack(r, cluster_pb2.Cluster) for r in cds.resources]) == {"alpha": "ernie--alpha"}
        send(envoy, CDS_TYPE_URL, version=cds.version_info, nonce=cds.nonce)  # ACK
        send(envoy, EDS_TYPE_URL, names=("ernie", "ernie--alpha"))
        eds = envoy.recv()
        assert sorted(_unpack(r, endpoint_pb2.ClusterLoadAssignment).cluster_name for r in eds.resources) == [
            "ernie",
            "ernie--alpha",
        ]
        send(envoy, EDS_TYPE_URL, names=("ernie", "ernie--alpha"), version=eds.version_info, nonce=eds.nonce)
        # a second model appears: a new cluster set (CDS) and new endpoints (EDS) are pushed
        server.publish(two_models())
        pushed = {r.type_url: r for r in (envoy.recv(), envoy.recv())}
        clusters = [_unpack(r, cluster_pb2.Cluster).name for r in pushed[CDS_TYPE_URL].resources]
        assert clusters == ["ernie--alpha", "ernie--beta", "ernie--gamma"]
        # Envoy asks for the new clusters' endpoints (warming): answered at once, though the version is the same
        eds = pushed[EDS_TYPE_URL]
        send(envoy, CDS_TYPE_URL, version=pushed[CDS_TYPE_URL].version_info, nonce=pushed[CDS_TYPE_URL].nonce)
        names = ("ernie", "ernie--alpha", "ernie--beta", "ernie--gamma")
        send(envoy, EDS_TYPE_URL, names=names, version=eds.version_info, nonce=eds.nonce)
        warm = envoy.recv()
        assert [_unpack(r, endpoint_pb2.ClusterLoadAssignment).cluster_name for r in warm.resources] == list(names)
        assert warm.version_info == eds.version_info
        assert wait_for(lambda: server.streams()[0].sub(CDS_TYPE_URL).acked_version == cds_version(pushed))
    finally:
        envoy.close()


def test_a_stale_request_naming_new_clusters_is_answered_by_the_next_one(server):
    """Failed before: a stale EDS request (answering a superseded response) that named new clusters
    recorded the names, so the request that acked the newer response looked like no change and the
    new clusters' endpoints were never sent (Envoy would warm them empty for initial_fetch_timeout)."""
    server.publish(build_snapshot([entry("a1", 8001, "alpha")], "ernie").snapshot)
    envoy = FakeEnvoy(server.port)
    try:
        send(envoy, EDS_TYPE_URL, names=("ernie",), first=True)
        first = envoy.recv()
        server.publish(build_snapshot([entry("a1", 8001, "alpha"), entry("a2", 8002, "alpha")], "ernie").snapshot)
        second = envoy.recv()  # pushed while Envoy was still answering the first
        new_names = ("ernie", "ernie--alpha")
        send(envoy, EDS_TYPE_URL, names=new_names, version=first.version_info, nonce=first.nonce)  # stale
        assert envoy.nothing()
        send(envoy, EDS_TYPE_URL, names=new_names, version=second.version_info, nonce=second.nonce)
        third = envoy.recv()
        assert len(third.resources) == 2
    finally:
        envoy.close()


def cds_version(pushed) -> str:
    return pushed[CDS_TYPE_URL].version_info


def _unpack(any_msg, cls):
    out = cls()
    any_msg.Unpack(out)
    return out


# --- the relay's routing -----------------------------------------------------------------------


def membership(models: dict[str, str], members: list[Member]) -> Membership:
    m = Membership(stall_s=1.0)

    async def fill() -> None:  # the Membership's event is made on a running loop
        m.update(members, "v1")
        m.update_models(models)

    asyncio.run(fill())
    return m


MEMBERS = [
    Member("a1", "127.0.0.1:8001", True, model="alpha", max_model_len=4096),
    Member("a2", "127.0.0.1:8002", True, model="alpha", max_model_len=2048),
    Member("b1", "127.0.0.1:8003", False, model="beta", max_model_len=1024),  # draining: not listed, takes nothing new
]


def test_with_several_models_a_request_goes_to_its_models_cluster():
    m = membership({"alpha": "ernie--alpha", "beta": "ernie--beta"}, MEMBERS)
    assert (m.route("alpha").cluster, m.route("alpha").model) == ("ernie--alpha", "alpha")
    unknown = m.route("gpt-4")
    assert (unknown.status, unknown.code) == (404, "model_not_found") and "alpha, beta" in unknown.message
    assert (m.route(None).status, m.route(None).code) == (400, "model_required")
    assert m.route(7).status == 0 and m.route(7).cluster == ""  # not a string: the engine says what is wrong
    assert m.served() == {"alpha": 2048}  # passing instances only, the smallest context of the model's
    assert {m.pick(set(), model="alpha").instance_id for _ in range(20)} == {"a1", "a2"}
    assert m.pick({"a1", "a2"}, model="alpha") is None  # never another model's instance


def test_with_one_model_the_engine_cluster_serves_it_and_model_may_be_left_out():
    m = membership({"alpha": "ernie--alpha"}, MEMBERS[:2])
    assert (m.route("alpha").cluster, m.route("alpha").model) == ("", "alpha")  # as before several models
    assert (m.route(None).cluster, m.route(None).model) == ("", "alpha")
    assert (m.route("").status, m.route("beta").status) == (0, 404)


def test_before_any_model_is_known_requests_go_to_the_engines_as_they_are():
    m = Membership(stall_s=1.0)
    assert m.route("anything").status == 0 and m.route(None).cluster == ""
    empty = membership({}, [])
    assert empty.route("anything").status == 0  # nothing registered: Envoy's 503, not a 404


def test_status_counts_each_models_passing_instances():
    from agent.status import _instance_row, models_of, render

    rows = [
        _instance_row(entry("a1", 8001, "alpha"), {}),
        _instance_row(entry("a2", 8002, "alpha", CheckStatus.CRITICAL), {}),
        _instance_row(entry("b1", 8003, "beta"), {}),
    ]
    models = models_of(rows)
    assert models == {"alpha": {"instances": 2, "passing": 1}, "beta": {"instances": 1, "passing": 1}}
    text = render(
        {"service": "ernie", "consul": "c", "passing": 2, "instances": rows, "models": models, "gateways": []}
    )
    assert "models: alpha 1/2 passing, beta 1/1 passing" in text


def test_the_gateway_counts_each_models_endpoints():
    from prometheus_client import generate_latest

    from agent.gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    first = two_models()
    metrics.published(first, None, 0)
    text = generate_latest(metrics.registry).decode()
    assert 'ernie_gateway_model_endpoints{model="alpha",state="healthy"} 2.0' in text
    assert 'ernie_gateway_model_endpoints{model="gamma",state="healthy"} 0.0' in text  # registered, down
    metrics.published(build_snapshot([entry("a1", 8001, "alpha")], "ernie").snapshot, first, 0)
    text = generate_latest(metrics.registry).decode()
    assert 'model="beta"' not in text and 'ernie_gateway_model_endpoints{model="alpha",state="healthy"} 1.0' in text


def test_a_continuation_stays_on_its_models_instances_when_a_second_model_appears_mid_stream():
    """One model served when the request came (its route names no cluster: the engine cluster); a
    second model registers while it streams. The continuation must go to an instance of the
    request's model (or one that names none), never the new model's: its vLLM answers 404 (refused),
    and the relay could spend every refusal on it and give up."""
    from agent.gateway.relay.handler import ROUTE, _model

    m = membership({"alpha": "ernie--alpha"}, MEMBERS[:2])
    route = m.route(None)
    assert route.cluster == "" and _model({ROUTE: route}) == "alpha"  # type: ignore[arg-type]
    m.members["b2"] = Member("b2", "127.0.0.1:8004", True, model="beta")
    m.members["old"] = Member("old", "127.0.0.1:8005", True, model="")  # an engine registered without model meta
    picks = {m.pick({"a1"}, model=_model({ROUTE: route})).instance_id for _ in range(20)}  # type: ignore[arg-type]
    assert picks <= {"a2", "old"} and "b2" not in picks
    assert m.pick({"a1", "a2", "old"}, model="alpha") is None
