"""The gateway under failure: real Consul, real Envoy, three SIMULATED engines, steady load from
ten official OpenAI clients. One Consul, one gateway and one set of engines for the module; every
test starts from three running, passing engines. The Consul-outage test stops Consul: it runs last."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from agent.catalog.base import VerdictState
from agent import pids
from tests.integration.gateway_support import (
    REPO,
    AUTH,
    TEST_API_KEY,
    Gateway,
    Load,
    Mesh,
    describe,
    failures,
    sim_mesh,
    wait_until,
)

SERVICE = "ernie"
TOKEN_DELAY_MS = 10
PROPAGATION_BOUND_S = 1.0  # generous: measured ~20-60 ms (bench/propagation.py)
CLIENTS = 10

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with sim_mesh(tmp_path_factory.mktemp("gateway"), "ernie-gw-test", SERVICE, TOKEN_DELAY_MS) as m:
        yield m


@pytest.fixture
def m(mesh):
    if mesh.gateway.proc is None or mesh.gateway.proc.poll() is not None:
        mesh.gateway.start()
    mesh.reset()
    return mesh


def envoy_stat(m: Mesh, name: str) -> int:
    return m.gateway.admin.stats(name).get(name, 0)


# --- 1. kill -9 under non-streaming load --------------------------------------------------------


def test_kill9_engine_under_load_fails_no_request(m):
    victim = m.engines[0]
    with Load(m.gateway.url, clients=CLIENTS, max_tokens=10) as load:
        load.wait_for_more(100)
        killed_at = time.monotonic()
        victim.proc.kill()
        ejected = wait_until(
            lambda: "failed_outlier_check" in m.gateway.endpoints().get(victim.id, ""),
            10,
            "the killed engine ejected by envoy",
        )
        detected_s = time.monotonic() - killed_at
        load.wait_for_more(200)
    results = load.results
    assert not failures(results), describe(results)
    after = [r for r in results if r.started > killed_at + 0.5]
    assert after and all(r.instance != victim.id for r in after)
    print(
        f"\nkill -9: ejected after {detected_s * 1000:.0f} ms; "
        f"retries {envoy_stat(m, 'cluster.ernie.upstream_rq_retry')}"
        f"; {len(results)} requests, 0 failed"
    )
    assert ejected


# --- 2. critical in Consul -> no new requests within 1 s ------------------------------------------


def test_critical_instance_gets_no_new_requests_within_1s(m):
    victim = m.engines[1]
    with Load(m.gateway.url, clients=CLIENTS, max_tokens=5) as load:
        load.wait_for_more(50)
        t0 = time.monotonic()
        victim.set(VerdictState.CRITICAL, "stuck")
        wait_until(
            lambda: victim.id not in m.gateway.endpoints(),
            PROPAGATION_BOUND_S,
            "the critical instance gone from envoy /clusters",
            interval_s=0.005,
        )
        propagation_s = time.monotonic() - t0
        wait_until(lambda: time.monotonic() > t0 + 1.0, 2, "1 s after the change")
        served_at_1s = victim.stats()["requests_total"]
        load.wait_for_more(150)
        served_at_end = victim.stats()["requests_total"]
    results = load.results
    assert not failures(results), describe(results)
    late = [r for r in results if r.started > t0 + 1.0]
    assert late, "no request started a second after the change"
    assert not [r for r in late if r.instance == victim.id]
    assert served_at_end == served_at_1s
    print(f"\ncritical: consul change -> envoy /clusters in {propagation_s * 1000:.0f} ms")
    # the agent measured its own push latency (change seen -> ACK)
    assert m.gateway.metric("ernie_gateway_xds_push_latency_seconds_count") >= 1
    assert m.gateway.metric("ernie_gateway_endpoints", 'state="healthy"') == 2


# --- 3. drain under streaming load ---------------------------------------------------------------


def test_drain_under_streaming_load_truncates_nothing(m):
    victim = m.engines[2]
    with Load(m.gateway.url, clients=CLIENTS, stream=True, max_tokens=30) as load:
        load.wait_for_more(40)
        victim.set(VerdictState.DRAINING, "rolling upgrade")
        wait_until(
            lambda: "draining" in m.gateway.endpoints().get(victim.id, ""),
            PROPAGATION_BOUND_S,
            "the instance draining in envoy",
            interval_s=0.005,
        )
        drained_at = time.monotonic()
        wait_until(lambda: victim.stats()["in_flight"] == 0, 15, "in-flight requests finished on the drained engine")
        wait_s = time.monotonic() - drained_at
        victim.proc.stop()  # SIGTERM: nothing left in flight to abort
        m.catalog.deregister(victim.id)
        load.wait_for_more(60)
    results = load.results
    assert not failures(results), describe(results)
    assert all(r.tokens == 30 and r.usage_tokens == 30 and r.finish_reason == "length" for r in results)
    served_by_victim = [r for r in results if r.instance == victim.id]
    assert served_by_victim, "the drained engine never served: the test proves nothing"
    print(
        f"\ndrain: in-flight streams on the drained engine done {wait_s * 1000:.0f} ms after the change; "
        f"{len(results)} streams complete, {len(served_by_victim)} of them from the drained engine"
    )


# --- 4. the gateway agent killed and restarted ---------------------------------------------------


def test_gateway_agent_killed_traffic_continues_then_converges(m):
    gw = m.gateway
    envoy_pid = gw.envoy_pid()
    target = m.engines[0]
    with Load(gw.url, clients=CLIENTS, max_tokens=5) as load:
        load.wait_for_more(50)
        gw.kill()  # SIGKILL: no cleanup at all
        load.wait_for_more(150)  # Envoy serves on its own
        assert gw.envoy_pid() == envoy_pid
        target.set(VerdictState.DRAINING, "while the agent is down")
        gw.start(wait=False)
        t0 = time.monotonic()
        # bound: a Python start on a busy 2-core machine (seconds) + Envoy's reconnect backoff (<= 1 s)
        wait_until(
            lambda: "draining" in gw.endpoints().get(target.id, ""),
            30,
            "envoy converged on the change made while the agent was down",
        )
        converged_s = time.monotonic() - t0
        target.set(VerdictState.PASSING, "back")
        wait_until(lambda: gw.endpoints().get(target.id) == "healthy", 5, "a new change propagates")
        load.wait_for_more(50)
    results = load.results
    assert not failures(results), describe(results)
    assert gw.envoy_pid() == envoy_pid, "the restarted agent should adopt the running envoy"
    assert "adopted the running envoy" in gw.log_tail(20000)
    print(f"\nagent restart: converged {converged_s * 1000:.0f} ms after start (envoy pid {envoy_pid} adopted)")


# --- 5. every engine gone -> fast JSON 503; back -> traffic resumes ------------------------------


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=10)


def _one_request(client: openai.OpenAI) -> tuple[float, object]:
    t = time.monotonic()
    try:
        resp = client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        return time.monotonic() - t, resp
    except openai.APIStatusError as e:
        return time.monotonic() - t, e


def _assert_fast_json_503s(clients: list[openai.OpenAI], per_client: int, phase: str) -> float:
    """Each client (one thread each) sends per_client requests back to back; every one must be a
    JSON 503 the OpenAI client can read, answered in under a second."""
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        outcomes = [
            o for batch in pool.map(lambda c: [_one_request(c) for _ in range(per_client)], clients) for o in batch
        ]
    worst = 0.0
    for elapsed, outcome in outcomes:
        assert isinstance(outcome, openai.APIStatusError), f"{phase}: {outcome}"
        assert outcome.status_code == 503, phase
        assert outcome.response.headers["content-type"].startswith("application/json"), phase
        err = outcome.response.json()["error"]
        assert err["type"] == "service_unavailable" and err["code"] == 503 and err["message"], phase
        worst = max(worst, elapsed)
    assert worst < 1.0, f"{phase}: a 503 took {worst:.2f}s"
    return worst


def test_all_engines_down_gives_fast_json_503_then_recovers(m):
    clients = [_client(m.gateway.url) for _ in range(CLIENTS)]
    probe = clients[0]
    try:
        for e in m.engines:
            e.set(VerdictState.CRITICAL, "maintenance")
        wait_until(lambda: not m.gateway.endpoints(), PROPAGATION_BOUND_S, "no endpoint left in envoy")
        worst_critical = _assert_fast_json_503s(clients, 3, "all critical")
        for e in m.engines:
            e.set(VerdictState.PASSING, "back")
        t0 = time.monotonic()
        wait_until(lambda: not isinstance(_one_request(probe)[1], Exception), 5, "traffic resumed")
        resumed_s = time.monotonic() - t0
        # engines that die without Consul knowing: connect failures, retried, then a JSON 503 at once
        for e in m.engines:
            e.proc.kill()
        worst_killed = _assert_fast_json_503s(clients, 3, "all killed")
        for e in m.engines:
            e.proc = None
            e.start()
        wait_until(
            lambda: not isinstance(_one_request(probe)[1], Exception), 15, "traffic resumed after the engines restarted"
        )
    finally:
        for c in clients:
            c.close()
    with Load(m.gateway.url, clients=CLIENTS, max_tokens=5) as load:
        load.wait_for_more(50)
    assert not failures(load.results), describe(load.results)
    print(
        f"\nall down: 503 JSON in <= {worst_critical * 1000:.0f} ms (critical), <= {worst_killed * 1000:.0f} ms "
        f"(killed); traffic resumed {resumed_s * 1000:.0f} ms after the engines passed again"
    )


# --- 6. a 400 storm ejects nobody and retries nothing --------------------------------------------

BAD_BODIES = [
    {"model": "sim-model"},
    {"model": "sim-model", "messages": "not a list"},
    {"model": "sim-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5},
    {"model": "sim-model", "messages": [{"role": "wizard", "content": "x"}]},
]


def test_400_storm_passes_through_no_ejection_no_retry(m):
    before = {
        k: envoy_stat(m, k)
        for k in (
            "cluster.ernie.outlier_detection.ejections_enforced_total",
            "cluster.ernie.outlier_detection.ejections_detected_consecutive_5xx",
            "cluster.ernie.upstream_rq_retry",
        )
    }
    by_engine_before = {e.id: e.stats()["by_status"].get("400", 0) for e in m.engines}

    http = httpx.Client(timeout=10, headers=AUTH, limits=httpx.Limits(max_connections=CLIENTS))  # one pool

    def bad(i: int) -> httpx.Response:
        if i % 5 == 4:
            return http.post(
                f"{m.gateway.url}/v1/chat/completions",
                content=b"{not json",
                headers={"content-type": "application/json"},
            )
        return http.post(f"{m.gateway.url}/v1/chat/completions", json=BAD_BODIES[i % len(BAD_BODIES)])

    n = 200
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        responses = list(pool.map(bad, range(n)))
    http.close()
    for r in responses:
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert r.headers.get("x-sim-engine"), "the 400 must come from the engine, untouched"
        assert r.headers.get("x-ernie-instance") in {e.id for e in m.engines}
        assert r.json()["error"]["message"]
    after = {k: envoy_stat(m, k) for k in before}
    assert after == before, f"ejections/retries moved: {before} -> {after}"
    assert m.healthy_in_envoy()
    served = sum(e.stats()["by_status"].get("400", 0) - by_engine_before[e.id] for e in m.engines)
    assert served == n  # each malformed request reached exactly one engine, once
    # the official client shows the engine's message
    client = openai.OpenAI(base_url=f"{m.gateway.url}/v1", api_key=TEST_API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="sim-model", messages=[{"role": "wizard", "content": "x"}])
    assert "role" in e.value.message
    client.close()


# --- several gateways side by side --------------------------------------------------------------


def test_engine_500s_caused_by_requests_do_not_eject_it(m):
    """A request that makes an engine answer 500, repeated, must not take the engine out of rotation
    for everyone: passive ejection is for local-origin failures (connect, reset, timeout); an
    engine's health is the engine agent's verdict."""
    victim = m.engines[0]
    victim.proc.set_fault("error_rate", error_rate=1.0)
    before = envoy_stat(m, "cluster.ernie.outlier_detection.ejections_enforced_total")
    statuses = []
    with httpx.Client(timeout=10, headers=AUTH) as http:
        for i in range(40):  # 40 users' conversations: spread over the instances by affinity
            r = http.post(
                f"{m.gateway.url}/v1/chat/completions",
                json={"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                headers={"x-session-id": f"user-{i}"},
            )
            statuses.append((r.status_code, r.headers.get("x-ernie-instance")))
    served_500 = [s for s in statuses if s == (500, victim.id)]
    assert len(served_500) >= 6, f"the engine should have answered several 500s in a row: {statuses}"
    assert envoy_stat(m, "cluster.ernie.outlier_detection.ejections_enforced_total") == before
    assert m.gateway.endpoints()[victim.id] == "healthy"


def test_a_trickled_request_is_cut_and_frees_its_slot(m, tmp_path):
    """Slowloris: a body sent a byte at a time holds nothing for long; generation time stays unbounded."""
    import socket

    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[policy]\nrequest_receive_timeout_s = 2\nrequest_headers_timeout_s = 1\n")
    gw = Gateway(
        m.consul.address, SERVICE, tmp_path / "gw-slow", name="gw-slow", extra_args=("--config", str(cfg))
    ).start()
    try:
        wait_until(lambda: len(gw.endpoints()) == 3, 10, "three endpoints in the second gateway")
        slow = socket.create_connection(("127.0.0.1", gw.listen_port), timeout=10)
        slow.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + TEST_API_KEY.encode() + b"\r\n"
            b"content-length: 1000\r\n\r\n{"
        )
        t0 = time.monotonic()
        answer = slow.recv(4096)
        waited = time.monotonic() - t0
        slow.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert waited < 5, f"the trickled request held its slot {waited:.1f}s"
        headers_only = socket.create_connection(("127.0.0.1", gw.listen_port), timeout=10)
        headers_only.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nauthorization: Bearer " + TEST_API_KEY.encode() + b"\r\n"
        )
        t0 = time.monotonic()
        answer = headers_only.recv(4096)
        assert time.monotonic() - t0 < 4 and (answer == b"" or answer.startswith(b"HTTP/1.1 408")), answer[:200]
        headers_only.close()
        # a long generation is not cut by the receive timeout
        r = httpx.post(
            f"{gw.url}/v1/chat/completions",
            timeout=30,
            headers=AUTH,
            json={
                "model": "sim-model",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 300,
                "ignore_eos": True,
            },
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 300
    finally:
        gw.cleanup()


def test_second_gateway_side_by_side_and_clean_stop(m, tmp_path):
    gw2 = Gateway(m.consul.address, SERVICE, tmp_path / "gw2", name="gw-two").start()
    try:
        wait_until(lambda: sorted(gw2.endpoints()) == sorted(e.id for e in m.engines), 5, "gw2 endpoints")
        assert gw2.envoy_pid() != m.gateway.envoy_pid()
        wait_until(
            lambda: len(httpx.get(f"{m.consul.url}/v1/health/service/ernie-gateway?passing=1", timeout=5).json()) == 2,
            10,
            "both gateways passing in Consul",
        )
        gateways = httpx.get(f"{m.consul.url}/v1/health/service/ernie-gateway", timeout=5).json()
        meta = {g["Service"]["ID"]: g["Service"]["Meta"] for g in gateways}
        assert meta["ernie-gateway-gw-two"]["listen_url"] == gw2.url
        assert meta["ernie-gateway-gw-two"]["metrics_url"] == gw2.metrics_url
        assert meta["ernie-gateway-gw-two"]["envoy_admin"].startswith("http://127.0.0.1:")
        m.engines[0].set(VerdictState.DRAINING, "both gateways see it")
        for gw in (m.gateway, gw2):
            wait_until(
                lambda gw=gw: "draining" in gw.endpoints().get(m.engines[0].id, ""),
                PROPAGATION_BOUND_S,
                f"{gw.name} sees the change",
                interval_s=0.005,
            )
        with Load(gw2.url, clients=4, max_tokens=3) as load:
            load.wait_for_more(20)
        assert not failures(load.results), describe(load.results)
        envoy2 = gw2.envoy_pid()
        assert gw2.terminate() == 0
        wait_until(lambda: envoy2 is None or not pids.alive(envoy2), 10, "gw2's envoy stopped with its agent")
        wait_until(
            lambda: (
                [
                    g["Service"]["ID"]
                    for g in httpx.get(f"{m.consul.url}/v1/health/service/ernie-gateway", timeout=5).json()
                ]
                == ["ernie-gateway-gw-test"]
            ),
            5,
            "gw2 deregistered",
        )
    finally:
        gw2.cleanup()


# --- Envoy dies -> the agent restarts it -----------------------------------------------------------


def test_envoy_killed_is_restarted_by_the_agent(m):
    old = m.gateway.envoy_pid()
    restarts = m.gateway.metric("ernie_gateway_envoy_restarts_total")
    os.kill(old, signal.SIGKILL)
    wait_until(
        lambda: m.gateway.envoy_pid() not in (None, old) and m.gateway.admin.ready(),
        30,
        "a new envoy started by the agent",
    )
    wait_until(m.healthy_in_envoy, 10, "the new envoy got the snapshot")
    assert m.gateway.metric("ernie_gateway_envoy_restarts_total") == restarts + 1
    with Load(m.gateway.url, clients=4, max_tokens=3) as load:
        load.wait_for_more(20)
    assert not failures(load.results), describe(load.results)
    assert f"envoy (pid {old}) died" in m.gateway.log_tail(50000)


# --- the edge's allow-list: only the OpenAI routes reach an engine ---------------------------------


def test_paths_off_the_allow_list_get_an_openai_404_and_reach_no_engine(m):
    url = m.gateway.url
    before = [e.stats()["requests_total"] for e in m.engines]
    # the simulated engine's fault switch, vLLM's other routes, tricks with the path
    for method, path in [
        ("POST", "/sim/fault"),
        ("GET", "/sim/stats"),
        ("GET", "/metrics"),
        ("GET", "/version"),
        ("POST", "/v1/embeddings"),
        ("GET", "/"),
        ("POST", "/v1/chat/completions/../../sim/fault"),
        ("POST", "/v1/chat/completionsX"),
    ]:
        r = httpx.request(method, f"{url}{path}", json={"mode": "hang"}, timeout=5, headers=AUTH)
        assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and "/v1/chat/completions" in err["message"], err
    for e in m.engines:
        assert e.proc.get_fault()["mode"] == "none", f"{e.id}: a fault was set through the gateway"
    assert [e.stats()["requests_total"] for e in m.engines] == before, "a request reached an engine"
    # the allowed ones still work, with a query string too
    assert httpx.get(f"{url}/v1/models?x=1", timeout=5, headers=AUTH).status_code == 200
    ok = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=10,
        headers=AUTH,
    )
    assert ok.status_code == 200, ok.text


def test_health_answers_200_while_an_instance_is_routable_then_503(m):
    url = m.gateway.url
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    for e in m.engines[1:]:
        e.set(VerdictState.CRITICAL, "test: one left")
    wait_until(lambda: len(m.gateway.endpoints()) == 1, 5, "one endpoint left")
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    m.engines[0].set(VerdictState.DRAINING, "test: none routable")
    wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 503, 5, "/health 503")
    r = httpx.get(f"{url}/health", timeout=5)
    assert r.json()["error"]["type"] == "service_unavailable", r.text


# --- API keys ---------------------------------------------------------------------------------------


def test_no_key_or_a_wrong_key_is_a_401_the_openai_sdk_reads_and_no_engine_sees_it(m):
    before = [e.stats()["requests_total"] for e in m.engines]
    for key in ("", "sk-ernie-wrong-0123456789abcdef"):
        client = openai.OpenAI(base_url=f"{m.gateway.url}/v1", api_key=key or "x", max_retries=0, timeout=10)
        if not key:
            client = client.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "hi"}])
        err = caught.value.response.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error", err
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    assert httpx.get(f"{m.gateway.url}/health", timeout=5).status_code == 200  # for load balancers: no key
    assert [e.stats()["requests_total"] for e in m.engines] == before
    # the engines never see the client's key; they see the key's name
    ok = httpx.post(
        f"{m.gateway.url}/v1/chat/completions",
        json={"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={**AUTH, "x-ernie-key-name": "forged"},
        timeout=10,
    )
    assert ok.status_code == 200, ok.text


def test_keys_added_and_revoked_in_consul_take_effect_within_seconds(m, tmp_path):
    """A second gateway with the default key store (Consul KV), driven by `ernie-mesh keys`."""
    gw = Gateway(m.consul.address, SERVICE, tmp_path / "gw-kv", name="gw-kv", extra_args=("--api-keys", "consul"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def keys(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "agent", "keys", "--consul", m.consul.address, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )

    def status(key: str) -> int:
        return httpx.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code

    try:
        added = keys("add", "alice", "--rpm", "600")
        assert added.returncode == 0, added.stderr
        key = added.stdout.strip()
        assert key.startswith("sk-ernie-")
        gw.start(wait=False)
        wait_until(lambda: gw.admin.ready(), 30, "gw-kv envoy ready")
        wait_until(lambda: status(key) == 200, 10, "alice's key accepted")
        assert status(TEST_API_KEY) == 401  # that one lives in the other gateways' file only
        listed = json.loads(keys("--json", "list").stdout)["keys"]
        assert [(k["name"], k["requests_per_minute"]) for k in listed] == [("alice", 600)]
        assert key not in json.dumps(listed)  # list shows fingerprints only
        assert keys("add", "alice").returncode == 1  # no silent overwrite
        second = keys("add", "bob").stdout.strip()
        wait_until(lambda: status(second) == 200, 5, "bob's key accepted within 5 s")
        revoked_at = time.monotonic()
        assert keys("revoke", "alice").returncode == 0
        wait_until(lambda: status(key) == 401, 5, "alice's key refused within 5 s")
        took = time.monotonic() - revoked_at
        assert status(second) == 200
        assert gw.metric("ernie_gateway_api_keys") == 1
        print(f"\nrevoked key refused {took * 1000:.0f} ms after `ernie-mesh keys revoke`")
    finally:
        gw.cleanup()


def test_rate_limits_and_model_allow_lists_per_key_answer_in_the_openai_shape(m):
    limited, thrifty, narrow = (f"sk-ernie-{n}-0123456789abcdef" for n in ("limited", "thrifty", "narrow"))
    m.gateway.keys_file.write_text(
        f'[keys.test]\nkey = "{TEST_API_KEY}"\n'
        f'[keys.limited]\nkey = "{limited}"\nrequests_per_minute = 3\n'
        f'[keys.thrifty]\nkey = "{thrifty}"\ntokens_per_minute = 10\n'
        f'[keys.narrow]\nkey = "{narrow}"\nmodels = ["another-model"]\n'
    )

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{m.gateway.url}/v1", api_key=key, max_retries=0, timeout=10)

    def ask(c: openai.OpenAI, max_tokens: int = 2, stream: bool = False):
        kwargs = dict(model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens)
        if stream:
            return list(c.chat.completions.create(stream=True, **kwargs))
        return c.chat.completions.with_raw_response.create(**kwargs)

    wait_until(lambda: m.gateway.metric("ernie_gateway_api_keys") == 4, 10, "the four keys loaded")
    # three requests a minute, over both relay processes (each request on its own connection)
    first = ask(client(limited))
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    ask(client(limited), stream=True)
    ask(client(limited))
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client(limited))
    r = caught.value.response
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests" and "limited" in err["message"]
    ask(client(TEST_API_KEY))  # other keys are not affected
    # tokens per minute, counted from usage: the first request may take the key over, the next waits
    ask(client(thrifty), max_tokens=40, stream=True)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client(thrifty))
    assert caught.value.response.json()["error"]["type"] == "tokens"
    # a model the key may not use
    with pytest.raises(openai.PermissionDeniedError) as denied:
        ask(client(narrow))
    assert denied.value.response.json()["error"]["code"] == "model_not_allowed"


def test_tls_at_the_edge_with_a_custom_ca_http2_and_a_renewed_certificate_without_a_restart(m, tmp_path):
    import ssl

    from tests.integration.tls_support import TestCA

    ca = TestCA(tmp_path / "pki")
    cert, key, first_serial = ca.issue("edge")
    conf = tmp_path / "gateway.toml"
    conf.write_text(f'[edge]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    gw = Gateway(m.consul.address, SERVICE, tmp_path / "gw-tls", name="gw-tls", extra_args=("--config", str(conf)))

    def served_serial() -> int:
        ctx = ssl.create_default_context(cafile=str(ca.path))
        with socket.create_connection(("127.0.0.1", gw.listen_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                der = tls.getpeercert(binary_form=True)
        from cryptography import x509

        return x509.load_der_x509_certificate(der).serial_number

    try:
        gw.start()
        url = f"https://localhost:{gw.listen_port}"
        trust = ssl.create_default_context(cafile=str(ca.path))
        with httpx.Client(verify=trust, http2=True, timeout=10) as http:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=TEST_API_KEY, max_retries=0, http_client=http)
            wait_until(lambda: len(gw.endpoints()) == 3, 10, "endpoints in gw-tls")
            raw = client.chat.completions.with_raw_response.create(
                model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            assert raw.http_response.http_version == "HTTP/2"
            assert raw.parse().choices[0].message.content
            chunks = list(
                client.chat.completions.create(
                    model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
                )
            )
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        # plaintext to a TLS listener, and a client that does not trust the CA, are refused
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{gw.listen_port}/v1/models", headers=AUTH, timeout=5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/v1/models", headers=AUTH, timeout=5)
        assert served_serial() == first_serial
        # renewal: the operator writes a new pair in place; new handshakes get it, no restart
        envoy_pid = gw.envoy_pid()
        new_cert, new_key, new_serial = ca.issue("edge-renewed")
        key.write_bytes(new_key.read_bytes())
        cert.write_bytes(new_cert.read_bytes())
        wait_until(lambda: served_serial() == new_serial, 10, "the renewed certificate served")
        assert gw.envoy_pid() == envoy_pid
    finally:
        gw.cleanup()


# --- a reload (SIGHUP): Envoy adopted, or hot-restarted on a policy change; nothing cut -----------


def _envoy_record(gw: Gateway) -> dict:
    return json.loads((gw.run_dir / "envoy.json").read_text())


def _reload(gw: Gateway) -> None:
    """SIGHUP, then wait until the re-executed agent serves xDS again (its log says so)."""
    marker = gw.log_tail(10**7).count("gateway gw-test: OpenAI API")
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: gw.log_tail(10**7).count("gateway gw-test: OpenAI API") > marker, 30, "the re-executed agent started"
    )


def test_reload_adopts_envoy_and_a_policy_change_hot_restarts_it_cutting_nothing(m, tmp_path):
    gw = m.gateway
    conf = tmp_path / "gateway.toml"
    same = "drain_deadline_s = 30\n"  # a replaced Envoy finishes its requests for 30 s at most
    conf.write_text(same)
    original_args = gw.extra_args
    gw.kill()
    gw.extra_args = (*original_args, "--config", str(conf))
    gw.start()
    agent_pid, first_envoy = gw.proc.pid, gw.envoy_pid()
    try:
        # streams of ~3 s (300 tokens at 10 ms) in flight through every replacement
        with Load(gw.url, clients=6, stream=True, max_tokens=300) as load:
            load.wait_for_more(6)
            _reload(gw)  # nothing changed: the same Envoy keeps serving
            assert gw.envoy_pid() == first_envoy
            load.wait_for_more(6)
            # one stream of ~15 s on the first Envoy: it is still draining at the third reload below
            # (the load's 3 s streams alone may all have ended by then, and the wait is not tested)
            long_stream: dict = {}

            def read_long() -> None:
                with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=60) as c:
                    chunks = c.chat.completions.create(
                        model="sim-model",
                        messages=[{"role": "user", "content": "long"}],
                        max_tokens=1500,
                        extra_body={"ignore_eos": True},
                        stream=True,
                    )
                    long_stream["tokens"] = sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content)

            reader = threading.Thread(target=read_long, daemon=True)
            reader.start()
            wait_until(lambda: any(e.stats()["in_flight"] for e in m.engines), 5, "the long stream under way")
            conf.write_text(same + "[policy]\nnum_retries = 2\n")  # another bootstrap
            _reload(gw)
            wait_until(lambda: gw.envoy_pid() != first_envoy and gw.admin.ready(), 30, "the hot-restarted envoy")
            second_envoy = gw.envoy_pid()
            wait_until(m.healthy_in_envoy, 10, "the new envoy got the snapshot")
            load.wait_for_more(12)
            # and back, while the first replaced Envoy still drains: the second hot restart (epoch 2)
            # waits until it has exited (Envoy keeps two generations at most)
            conf.write_text(same)
            _reload(gw)
            assert gw.envoy_pid() == second_envoy and pids.alive(first_envoy)
            wait_until(lambda: gw.envoy_pid() != second_envoy and gw.admin.ready(), 30, "the second hot restart")
            assert not pids.alive(first_envoy)
            wait_until(m.healthy_in_envoy, 10, "the newest envoy got the snapshot")
            load.wait_for_more(12)
        reader.join(60)
        assert long_stream.get("tokens") == 1500, long_stream  # drained, not cut
        # the replaced Envoys finish their streams and are stopped (no connection left)
        for old in (first_envoy, second_envoy):
            wait_until(lambda old=old: not pids.alive(old), 60, f"the replaced envoy {old} exited")
        results = load.results
        assert not failures(results), describe(results)
        assert gw.proc.pid == agent_pid and gw.proc.poll() is None, "a reload keeps the agent's pid"
        assert _envoy_record(gw)["restart_epoch"] == 2
        log = gw.log_tail(10**7)
        assert log.count("hot restart (it finishes its requests") == 2, log[-3000:]
        assert "hot restart once it has exited" in log
        assert "adopted the running envoy" in log
        print(f"\nreload: {len(results)} streams, 0 failed across 2 hot restarts of envoy")
    finally:
        gw.kill()
        gw.extra_args = original_args
        gw.start()


def test_stop_lets_a_stream_longer_than_the_old_5s_drain_finish(m):
    gw = m.gateway
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=60)
    tokens: list[str] = []
    finish: list[str] = []
    first_token = threading.Event()

    def stream() -> None:
        chunks = client.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=800,  # 8 s at 10 ms per token
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in chunks:
            for choice in chunk.choices:
                if choice.delta.content:
                    tokens.append(choice.delta.content)
                    first_token.set()
                if choice.finish_reason:
                    finish.append(choice.finish_reason)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert first_token.wait(10), "the stream started"
    stopping_at = time.monotonic()
    code = gw.terminate(timeout_s=60)
    stopped_s = time.monotonic() - stopping_at
    t.join(10)
    client.close()
    assert code == 0
    assert finish == ["length"] and len(tokens) == 800, f"{len(tokens)} tokens, finish {finish}: the stop cut it"
    assert stopped_s > 5.0, f"the agent stopped {stopped_s:.1f}s after SIGTERM: before the stream ended?"
    print(f"\nstop: the 8 s stream finished; the agent exited {stopped_s:.1f}s after SIGTERM")


# --- last: Consul stopped -> traffic continues on the last snapshot ------------------------------


def test_zz_consul_stopped_traffic_continues_and_an_empty_restart_drops_nothing(m):
    with Load(m.gateway.url, clients=CLIENTS, max_tokens=5) as load:
        load.wait_for_more(50)
        m.consul.stop()
        wait_until(lambda: m.gateway.metric("ernie_gateway_consul_up") == 0, 15, "the agent notices the outage")
        load.wait_for_more(150)
        assert m.healthy_in_envoy()
        # a -dev Consul comes back empty: the gateway holds the instances while they re-register
        m.consul.start()
        wait_until(lambda: m.gateway.metric("ernie_gateway_consul_up") == 1, 15, "the agent sees Consul again")
        load.wait_for_more(100)
        assert m.healthy_in_envoy()
        for e in m.engines:
            e.register()  # what each engine agent does when its TTL update finds no check
        load.wait_for_more(50)
    assert not failures(load.results), describe(load.results)
    assert m.gateway.metric("ernie_gateway_consul_watch_errors_total") >= 1
    assert m.healthy_in_envoy()
    log = m.gateway.log_tail(50000)
    assert "keeping the last snapshot" in log and "keeping 3 absent instance(s)" in log


def test_envoy_and_the_relays_do_not_inherit_the_consul_token(m, tmp_path, monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "secret-consul-token-for-the-agent-only")
    gw = Gateway(m.consul.address, SERVICE, tmp_path / "gw-env", name="gw-env").start()
    try:
        relay_pids = [json.loads(p.read_text())["pid"] for p in sorted(gw.run_dir.glob("relay-*.json"))]
        for pid in [gw.envoy_pid(), *relay_pids]:
            environ = open(f"/proc/{pid}/environ", "rb").read()
            assert b"secret-consul-token" not in environ, f"pid {pid} inherited CONSUL_HTTP_TOKEN"
        assert b"secret-consul-token" in open(f"/proc/{gw.proc.pid}/environ", "rb").read()  # the agent has it
    finally:
        gw.cleanup()
