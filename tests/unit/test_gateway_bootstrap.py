"""Envoy bootstrap rendering: every placeholder filled, every docs/architecture.md §5.2 trap avoided, Envoy
accepts it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.gateway import bootstrap
from agent.gateway.config import DEFAULT_BOOTSTRAP_TEMPLATE, GatewayConfig, PolicyConfig, finish
from tests.unit.envoy_support import envoy_validate


def cfg(**kw) -> GatewayConfig:
    base = dict(
        name="gw-test",
        listen="127.0.0.1:18080",
        envoy_admin="127.0.0.1:19901",
        xds="127.0.0.1:18001",
        metrics="127.0.0.1:19102",
        run_dir="/tmp/unused",
    )
    base.update(kw)
    return finish(GatewayConfig(**base))


def rendered(c: GatewayConfig | None = None) -> dict:
    text = bootstrap.render(DEFAULT_BOOTSTRAP_TEMPLATE.read_text(), c or cfg())
    assert "${" not in text
    return yaml.safe_load(text)


def engines_cluster(doc: dict) -> dict:
    return next(c for c in doc["static_resources"]["clusters"] if c["name"] == "ernie")


def hcm(doc: dict, listener: str = "openai_api") -> dict:
    lst = next(x for x in doc["static_resources"]["listeners"] if x["name"] == listener)
    return lst["filter_chains"][0]["filters"][0]["typed_config"]


def routes(doc: dict, listener: str = "openai_api") -> list[dict]:
    return hcm(doc, listener)["route_config"]["virtual_hosts"][0]["routes"]


def route(doc: dict) -> dict:
    """The edge's route straight to the engines (the allow-list but the generation routes)."""
    return next(r for r in routes(doc) if "safe_regex" in r["match"])


def edge_headers(doc: dict) -> dict:
    vhost = hcm(doc)["route_config"]["virtual_hosts"][0]
    pairs = vhost.get("response_headers_to_add", []) + route(doc)["response_headers_to_add"]
    return {h["header"]["key"]: h["header"]["value"] for h in pairs}


def test_addresses_and_names_come_from_the_config():
    doc = rendered()
    assert doc["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}
    assert doc["static_resources"]["listeners"][0]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 18080,
    }
    xds = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "ernie_xds")
    assert xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 18001,
    }
    assert doc["node"]["id"] == "ernie-gateway-gw-test"


def test_eds_over_ads_and_fast_reconnect():
    doc = rendered()
    c = engines_cluster(doc)
    assert c["type"] == "EDS" and c["eds_cluster_config"]["eds_config"]["ads"] == {}
    ads = doc["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "GRPC"
    backoff = ads["grpc_services"][0]["envoy_grpc"]["retry_policy"]["retry_back_off"]
    assert backoff["max_interval"] == "1s"


def test_design_traps_are_avoided():
    doc = rendered()
    c = engines_cluster(doc)
    assert c["lb_policy"] == "MAGLEV"  # [routing] mode = "affinity", the default
    assert c["common_lb_config"]["healthy_panic_threshold"]["value"] == 0
    assert "health_checks" not in c  # Consul is the truth
    od = c["outlier_detection"]
    # connect failures, resets and timeouts eject; an engine's 5xx (a request can cause it) never does
    assert od["split_external_local_origin_errors"] is True
    assert od["enforcing_consecutive_local_origin_failure"] == 100 and od["consecutive_local_origin_failure"] == 3
    assert od["enforcing_consecutive_gateway_failure"] == 0 and od["enforcing_consecutive_5xx"] == 0
    assert od["max_ejection_percent"] > 100 / 3  # one host of three can be ejected
    assert od["successful_active_health_check_uneject_host"] is False
    cb = c["circuit_breakers"]["thresholds"][0]
    assert cb["max_requests"] > 1024 and "retry_budget" in cb
    assert hcm(doc)["request_headers_timeout"] == "10s" and hcm(doc)["request_timeout"] == "60s"  # slowloris
    r = route(doc)
    assert r["route"]["timeout"] == "0s"
    assert r["route"]["idle_timeout"] == "120s" and hcm(doc)["stream_idle_timeout"] == "120s"
    rp = r["route"]["retry_policy"]
    conditions = set(rp["retry_on"].split(","))
    assert conditions == {"connect-failure", "refused-stream", "reset", "retriable-status-codes"}
    assert rp["retriable_status_codes"] == [503]
    assert not conditions & {"5xx", "4xx", "retriable-4xx", "gateway-error"}
    assert rp["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    assert "per_try_timeout" not in rp  # only bounds time to headers; vLLM streams send them first
    filters = [f["name"] for f in hcm(doc)["http_filters"]]
    assert filters == ["ernie.api_keys", "envoy.filters.http.router"]  # nothing buffers a stream


def test_generation_routes_go_through_the_relay_processes():
    from agent.gateway.config import RelaySettings

    doc = rendered(cfg(relay=RelaySettings(processes=3)))
    by_path = {r["match"].get("path"): r for r in routes(doc) if r["match"].get("path", "").startswith("/v1/")}
    # /v1/models too: the relay lists every model a passing instance serves (several models)
    assert set(by_path) == {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    for r in by_path.values():
        assert r["route"]["cluster"] == "ernie_relay" and r["route"]["timeout"] == "0s"
        # a relay that is restarting refuses the connection: the request goes to another relay
        assert set(r["route"]["retry_policy"]["retry_on"].split(",")) == {"connect-failure", "refused-stream", "reset"}
        assert "response_headers_to_add" not in r  # x-ernie-instance comes from the relay (the engine's)
    relay = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "ernie_relay")
    pipes = [e["endpoint"]["address"]["pipe"]["path"] for e in relay["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert pipes == ["/tmp/unused/relay-0.sock", "/tmp/unused/relay-1.sock", "/tmp/unused/relay-2.sock"]


def test_the_engine_hop_is_a_private_socket_with_host_override_for_continuations():
    doc = rendered()
    hop = next(x for x in doc["static_resources"]["listeners"] if x["name"] == "engine_hop")
    assert hop["address"]["pipe"] == {"path": "/tmp/unused/engine-hop.sock", "mode": 0o600}
    filters = hcm(doc, "engine_hop")["http_filters"]
    assert filters[0]["name"] == "envoy.filters.http.stateful_session"
    assert filters[0]["typed_config"]["strict"] is True  # a continuation goes where the relay said, or 503
    assert filters[0]["typed_config"]["session_state"]["typed_config"]["name"] == "x-ernie-host"
    model_resume, resume, model_fresh, fresh, unknown = routes(doc, "engine_hop")
    assert unknown["direct_response"]["status"] == 404
    assert resume["match"]["headers"][0]["name"] == "x-ernie-attempt"
    # the relay names the request's model cluster (several models); without it, every engine's cluster
    for with_model, without in ((model_resume, resume), (model_fresh, fresh)):
        assert with_model["route"].pop("cluster_header") == "x-ernie-cluster"
        assert {"name": "x-ernie-cluster", "present_match": True} in with_model["match"]["headers"]
        assert without["route"].pop("cluster") == "ernie"
        assert with_model["route"] == without["route"]  # the same policy either way
    assert "retry_policy" not in resume["route"]  # Envoy's retries must not multiply with resumes
    edge_policy, hop_policy = route(doc)["route"]["retry_policy"], fresh["route"]["retry_policy"]
    # a reset before the response is not retried on the hop (a prompt of death would walk the
    # fleet): the relay tries one more instance at most; everything else is the edge's policy
    assert set(hop_policy.pop("retry_on").split(",")) == set(edge_policy.pop("retry_on").split(",")) - {"reset"}
    assert hop_policy == edge_policy
    for r in (model_resume, resume, model_fresh, fresh):
        assert r["response_headers_to_add"][0]["header"]["value"] == "%UPSTREAM_HOST_NAME%"
    assert hcm(doc, "engine_hop")["local_reply_config"] == hcm(doc)["local_reply_config"]


def test_instance_header_and_json_local_replies():
    doc = rendered()
    headers = edge_headers(doc)
    assert headers["x-ernie-instance"] == "%UPSTREAM_HOST_NAME%"
    assert headers["x-ernie-gateway"] == "gw-test"
    lr = hcm(doc)["local_reply_config"]
    by_status = {m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]: m for m in lr["mappers"]}
    err = by_status[503]["body_format_override"]["json_format"]["error"]
    assert err["type"] == "service_unavailable" and err["code"] == "%RESPONSE_CODE%"
    # what the OpenAI SDK raises AuthenticationError on
    err = by_status[401]["body_format_override"]["json_format"]["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key"


def test_policy_knobs_are_rendered():
    doc = rendered(
        cfg(
            policy=PolicyConfig(
                num_retries=5, outlier_max_ejection_percent=66, stream_idle_timeout_s=30.5, retry_back_off_base_s=0.01
            )
        )
    )
    rp = route(doc)["route"]["retry_policy"]
    assert rp["num_retries"] == 5 and rp["retry_back_off"]["base_interval"] == "0.01s"
    assert engines_cluster(doc)["outlier_detection"]["max_ejection_percent"] == 66
    assert route(doc)["route"]["idle_timeout"] == "30.5s"


def test_names_are_quoted_not_injected():
    doc = rendered(cfg(name="a-b_c"))
    assert edge_headers(doc)["x-ernie-gateway"] == "a-b_c"


def test_unknown_placeholder_is_an_error():
    with pytest.raises(KeyError):
        bootstrap.render("x: ${nope}\n", cfg())


@pytest.mark.parametrize("api_keys,mode", [("consul", "affinity"), ("off", "least-request")])
def test_envoy_accepts_the_rendered_bootstrap(tmp_path: Path, api_keys: str, mode: str):
    from agent.gateway import keys
    from agent.gateway.config import EdgeSettings, RoutingSettings

    c = cfg(run_dir=str(tmp_path), edge=EdgeSettings(api_keys=api_keys), routing=RoutingSettings(mode=mode))
    keys.write_files(Path(c.keys_dir), keys.KeySet((keys.ApiKey("alice", keys.new_key()),)))
    path = tmp_path / "bootstrap.yaml"
    path.write_text(bootstrap.render(DEFAULT_BOOTSTRAP_TEMPLATE.read_text(), c))
    out = envoy_validate(path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "deprecated" not in (out.stdout + out.stderr).lower()
    filters = [f["name"] for f in hcm(yaml.safe_load(path.read_text()))["http_filters"]]
    assert ("ernie.api_keys" in filters) == (api_keys != "off")


def test_a_vanished_host_s_connections_are_reset_by_the_kernel():
    # No reset comes from a host lost to power or network: keepalive (response pending) and
    # TCP_USER_TIMEOUT (request unacknowledged) bound the wait, then retry_on reset moves the request.
    c = engines_cluster(rendered(cfg(policy=PolicyConfig(upstream_dead_peer_timeout_s=6))))
    ka = c["upstream_connection_options"]["tcp_keepalive"]
    assert (ka["keepalive_time"], ka["keepalive_interval"], ka["keepalive_probes"]) == (3, 1, 3)
    [opt] = c["upstream_bind_config"]["socket_options"]
    assert (opt["level"], opt["name"], opt["int_value"]) == (6, 18, 6000)  # IPPROTO_TCP, TCP_USER_TIMEOUT


def test_the_relay_can_be_turned_off_and_its_share_changed_at_runtime():
    from agent.gateway.config import RelaySettings

    def share(doc):
        return {
            r["match"]["path"]: r["match"]["runtime_fraction"] for r in routes(doc) if "runtime_fraction" in r["match"]
        }

    on, off = rendered(), rendered(cfg(relay=RelaySettings(enabled=False)))
    for doc, percent in ((on, 100), (off, 0)):
        for frac in share(doc).values():
            assert frac == {
                "default_value": {"numerator": percent, "denominator": "HUNDRED"},
                "runtime_key": "ernie.relay.percent",
            }
        assert doc["layered_runtime"]["layers"][0]["static_layer"] == {"ernie.relay.percent": percent}
        assert {"name": "admin", "admin_layer": {}} in doc["layered_runtime"]["layers"]  # /runtime_modify
    relay = next(c for c in off["static_resources"]["clusters"] if c["name"] == "ernie_relay")
    assert relay["load_assignment"]["endpoints"][0]["lb_endpoints"] == []


def test_sockets_move_to_a_short_directory_when_run_dir_is_too_long():
    long_dir = "/tmp/" + "d" * 120
    c = cfg(run_dir=long_dir)
    assert len(c.hop_socket.encode()) <= 107 and not c.hop_socket.startswith(long_dir)
    assert c.socket_dir == cfg(run_dir=long_dir).socket_dir  # the same run_dir, the same sockets (adoption)
    assert cfg().hop_socket == "/tmp/unused/engine-hop.sock"


def test_only_the_allow_list_is_routed_and_the_rest_is_an_openai_404():
    import re

    from agent.gateway.config import EdgeSettings

    doc = rendered(cfg(edge=EdgeSettings(extra_paths=("/v1/embeddings", "/tokenize"))))
    allowed = re.compile(route(doc)["match"]["safe_regex"]["regex"])
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/tokenize"):
        assert allowed.fullmatch(path), path
    for path in ("/sim/fault", "/metrics", "/v1/models/x", "/v1/embeddingsX", "/", "/v1/chat/completions/../x"):
        assert not allowed.fullmatch(path), path
    last = routes(doc)[-1]
    assert last["match"] == {"prefix": "/"} and last["direct_response"]["status"] == 404
    assert "/v1/embeddings" in last["direct_response"]["body"]["inline_string"]
    health = next(r for r in routes(doc) if r["match"] == {"path": "/health"})
    assert health["route"]["cluster"] == "ernie"  # 200 from a routable instance, else Envoy's 503
    # the relay's hop serves the two generation routes only
    hop = routes(doc, "engine_hop")
    assert [r["match"].get("safe_regex", {}).get("regex") for r in hop[:4]] == ["^/v1/(chat/)?completions$"] * 4
    assert hop[-1]["match"] == {"prefix": "/"} and hop[-1]["direct_response"]["status"] == 404


@pytest.mark.parametrize("bad", ["v1/x", "/a b", "/x/../y", "//x", "/health", "/x?y=1"])
def test_extra_paths_must_be_plain_paths(bad):
    from agent.config import ConfigError
    from agent.gateway.config import EdgeSettings

    with pytest.raises(ConfigError, match="edge.extra_paths"):
        EdgeSettings(extra_paths=(bad,))


def test_edge_tls_is_rendered_and_envoy_accepts_it(tmp_path: Path):
    from agent.gateway.config import EdgeSettings
    from agent.gateway.edge_tls import EdgeCertificate
    from tests.integration.tls_support import TestCA

    ca = TestCA(tmp_path / "pki")
    cert, key, _serial = ca.issue("edge")
    c = cfg(run_dir=str(tmp_path / "run"), edge=EdgeSettings(api_keys="off", tls_cert=str(cert), tls_key=str(key)))
    EdgeCertificate(str(cert), str(key), c.tls_dir).prepare()
    assert c.listen_url.startswith("https://")
    path = tmp_path / "bootstrap.yaml"
    path.write_text(bootstrap.render(DEFAULT_BOOTSTRAP_TEMPLATE.read_text(), c))
    chain = yaml.safe_load(path.read_text())["static_resources"]["listeners"][0]["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2", "http/1.1"]
    out = envoy_validate(path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_edge_tls_needs_both_files_readable(tmp_path: Path):
    from agent.config import ConfigError
    from agent.gateway.config import EdgeSettings

    with pytest.raises(ConfigError, match="go together"):
        EdgeSettings(tls_cert=str(tmp_path / "a.crt"))
    with pytest.raises(ConfigError, match="not a readable file"):
        EdgeSettings(tls_cert=str(tmp_path / "a.crt"), tls_key=str(tmp_path / "a.key"))


def hop_first_attempt_route(doc: dict) -> dict:
    return next(r for r in routes(doc, "engine_hop") if "headers" not in r["match"] and "safe_regex" in r["match"])


def test_affinity_routing_hashes_the_relays_key_with_a_load_bound():
    from agent.gateway.config import RoutingSettings

    doc = rendered()
    c = engines_cluster(doc)
    assert c["lb_policy"] == "MAGLEV"
    assert c["common_lb_config"]["consistent_hashing_lb_config"] == {"hash_balance_factor": 150}
    assert hop_first_attempt_route(doc)["route"]["hash_policy"] == [{"header": {"header_name": "x-ernie-affinity"}}]
    assert route(doc)["route"]["hash_policy"] == [{"header": {"header_name": "x-session-id"}}]  # relay off
    unbounded = engines_cluster(rendered(cfg(routing=RoutingSettings(hash_balance_factor=0))))
    assert unbounded["common_lb_config"]["consistent_hashing_lb_config"] == {}


def test_least_request_routing_has_no_hash_policy():
    from agent.gateway.config import RoutingSettings

    doc = rendered(cfg(routing=RoutingSettings(mode="least-request")))
    assert engines_cluster(doc)["lb_policy"] == "LEAST_REQUEST"
    assert "consistent_hashing_lb_config" not in engines_cluster(doc)["common_lb_config"]
    assert hop_first_attempt_route(doc)["route"]["hash_policy"] == []
