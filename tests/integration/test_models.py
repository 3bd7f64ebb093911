"""Several models through one gateway: real Consul, real Envoy, the relay processes, SIMULATED engines
serving two model names (a third appears at run time). Each model's requests reach its instances
only (its own Envoy cluster, over CDS), /v1/models lists what passes, an unknown model is the OpenAI
404, a killed instance's streams resume on the same model's other instance, and a new model gets
traffic without a restart and without failing the other model's requests in flight."""

from __future__ import annotations

import os
import signal

import httpx
import openai
import pytest

from agent.catalog.base import VerdictState
from agent.local.consul_dev import ConsulDev
from agent.catalog.consul import ConsulCatalog
from agent.local.ports import free_ports
from tests.integration.gateway_support import (
    AUTH,
    TEST_API_KEY,
    Engine,
    Gateway,
    Load,
    describe,
    failures,
    wait_until,
)

SERVICE = "ernie"
TOKEN_DELAY_MS = 10
MODELS = {"alpha": 4096, "beta": 2048}  # served model name -> max_model_len
pytestmark = pytest.mark.timeout(180)


class Mesh:
    def __init__(self, root):
        (root / "consul").mkdir()
        self.root = root
        self.consul = ConsulDev(node="models", data_dir=str(root / "consul")).start()
        self.catalog = ConsulCatalog(self.consul.address)
        self.engines: list[Engine] = []
        self.gateway: Gateway | None = None

    def add(self, model: str, max_model_len: int) -> Engine:
        (port,) = free_ports(1)
        e = Engine(self.catalog, SERVICE, port, self.root, TOKEN_DELAY_MS, model=model, max_model_len=max_model_len)
        self.engines.append(e.start())
        e.register()
        return e

    def of(self, model: str) -> list[Engine]:
        return [e for e in self.engines if e.model == model]

    def ids(self, model: str) -> set[str]:
        return {e.id for e in self.of(model)}

    def listed(self) -> dict[str, dict]:
        r = httpx.get(f"{self.gateway.url}/v1/models", headers=AUTH, timeout=5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list"
        return {card["id"]: card for card in body["data"]}

    def requests_total(self, model: str) -> int:
        return sum(e.stats()["requests_total"] for e in self.of(model) if e.running)

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.cleanup()
        for e in self.engines:
            e.stop()
        self.consul.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = Mesh(tmp_path_factory.mktemp("models"))
    try:
        for model, max_len in MODELS.items():
            m.add(model, max_len)
            m.add(model, max_len)
        m.gateway = Gateway(m.consul.address, SERVICE, m.root / "gw").start()
        wait_until(lambda: set(m.listed()) == set(MODELS), 15, "both models listed")
        yield m
    finally:
        m.stop()


def client(m: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{m.gateway.url}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=20)


def chat(c: openai.OpenAI, model: str, stream: bool, session: str, max_tokens: int = 5) -> tuple[str, str, int]:
    """(the instance that served, the model the answer names, completion tokens)."""
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=max_tokens,
        extra_body={"ignore_eos": True},
        extra_headers={"x-session-id": session},
    )
    if stream:
        raw = c.chat.completions.with_raw_response.create(stream=True, **kwargs)
        chunks = list(raw.parse())
        tokens = sum(1 for ch in chunks for choice in ch.choices if choice.delta.content)
        assert chunks[-1].choices[0].finish_reason == "length"
        return raw.headers["x-ernie-instance"], chunks[0].model, tokens
    raw = c.chat.completions.with_raw_response.create(**kwargs)
    resp = raw.parse()
    return raw.headers["x-ernie-instance"], resp.model, resp.usage.completion_tokens


def test_each_models_requests_reach_only_its_instances(mesh):
    listed = mesh.listed()
    for model, max_len in MODELS.items():
        assert listed[model]["object"] == "model" and listed[model]["max_model_len"] == max_len, listed
    # one Envoy cluster per model, with that model's instances only
    for model in MODELS:
        assert set(mesh.gateway.endpoints(f"{SERVICE}--{model}")) == mesh.ids(model)
    c = client(mesh)
    served: dict[str, set[str]] = {m: set() for m in MODELS}
    for model in MODELS:
        for i in range(12):
            instance, answered_as, tokens = chat(c, model, stream=i % 2 == 0, session=f"{model}-{i}")
            assert instance in mesh.ids(model), f"a {model} request was served by {instance}"
            assert answered_as == model and tokens == 5
            served[model].add(instance)
    assert all(served.values())


def test_an_unknown_model_is_the_openai_404_and_no_engine_sees_it(mesh):
    before = {m: mesh.requests_total(m) for m in MODELS}
    for stream in (False, True):
        r = httpx.post(
            f"{mesh.gateway.url}/v1/chat/completions",
            headers=AUTH,
            timeout=10,
            json={"model": "gamma-unknown", "messages": [{"role": "user", "content": "hi"}], "stream": stream},
        )
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == "model", err
        assert err["code"] == "model_not_found" and "gamma-unknown" in err["message"]
    # several models served: a request must name one (400, not a guess)
    r = httpx.post(
        f"{mesh.gateway.url}/v1/completions", headers=AUTH, timeout=10, json={"prompt": "hi", "max_tokens": 2}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_required", r.text
    assert {m: mesh.requests_total(m) for m in MODELS} == before, "an engine saw a refused request"
    for model in MODELS:  # nothing ejected
        assert all(v == "healthy" for v in mesh.gateway.endpoints(f"{SERVICE}--{model}").values())


def test_a_model_whose_instances_stop_passing_leaves_v1_models_and_answers_503(mesh):
    for e in mesh.of("beta"):
        e.set(VerdictState.CRITICAL, "test")
    try:
        wait_until(lambda: set(mesh.listed()) == {"alpha"}, 10, "beta dropped from /v1/models")
        c = client(mesh)
        with pytest.raises(openai.APIStatusError) as err:
            chat(c, "beta", stream=False, session="down")
        assert err.value.status_code == 503  # known but down: retry later (not "does not exist")
        assert chat(c, "alpha", stream=True, session="up")[0] in mesh.ids("alpha")
    finally:
        for e in mesh.of("beta"):
            e.set(VerdictState.PASSING, "test")
    wait_until(lambda: set(mesh.listed()) == set(MODELS), 10, "beta listed again")


def test_an_instance_killed_mid_stream_resumes_on_the_same_models_other_instance(mesh):
    gw = mesh.gateway
    resumed_before = gw.metric("ernie_gateway_relay_resumes_total", 'outcome="ok",reason="engine_lost"')
    alpha_before = mesh.requests_total("alpha")
    with Load(gw.url, clients=8, stream=True, max_tokens=80, model="beta") as load:
        load.wait_for_more(8, timeout_s=60)
        # a moment when one beta engine carries two streams (a loaded machine may make the load thin)
        victim = wait_until(
            lambda: next((e for e in mesh.of("beta") if e.stats()["in_flight"] >= 2), None),
            60,
            "a beta engine with two streams in flight",
            interval_s=0.01,
        )
        os.kill(victim.proc.pid, signal.SIGKILL)
        load.wait_for_more(16, timeout_s=60)
    assert not failures(load.results), describe(load.results)
    assert {r.instance for r in load.results} <= mesh.ids("beta")
    assert mesh.requests_total("alpha") == alpha_before, "a beta stream was continued on an alpha instance"
    resumed = gw.metric("ernie_gateway_relay_resumes_total", 'outcome="ok",reason="engine_lost"') - resumed_before
    assert resumed >= 1, "the kill hit streams in flight: they must have been resumed"
    # back to two passing beta instances (its agent would restart it; here the test does)
    victim.set(VerdictState.CRITICAL, "killed")
    wait_until(lambda: victim.id not in gw.endpoints(f"{SERVICE}--beta"), 10, "the killed engine out of envoy")
    victim.ensure_healthy()
    wait_until(lambda: gw.endpoints(f"{SERVICE}--beta").get(victim.id) == "healthy", 10, "it is back")


def test_a_new_model_at_run_time_gets_traffic_and_fails_nothing_in_flight(mesh):
    gw = mesh.gateway
    envoy_pid = gw.envoy_pid()
    with Load(gw.url, clients=4, stream=True, max_tokens=60, model="alpha") as load:
        load.wait_for_more(4, timeout_s=60)
        gamma = mesh.add("gamma", 1024)
        wait_until(lambda: "gamma" in mesh.listed(), 10, "gamma listed")
        c = client(mesh)
        for i in range(4):
            instance, answered_as, _ = chat(c, "gamma", stream=i % 2 == 0, session=f"g{i}")
            assert instance == gamma.id and answered_as == "gamma"
        load.wait_for_more(8, timeout_s=60)
    assert not failures(load.results), describe(load.results)
    assert {r.instance for r in load.results} <= mesh.ids("alpha")
    assert gw.envoy_pid() == envoy_pid, "Envoy was replaced: a new model must come without a restart"
    assert set(gw.endpoints(f"{SERVICE}--gamma")) == {gamma.id}

    # Down to one model: a request without `model` goes to it, as before several models were served.
    for e in mesh.of("beta") + mesh.of("gamma"):
        mesh.catalog.deregister(e.id)
    wait_until(lambda: set(mesh.listed()) == {"alpha"}, 10, "alpha alone")

    def unnamed() -> httpx.Response:
        return httpx.post(f"{gw.url}/v1/completions", headers=AUTH, timeout=10, json={"prompt": "hi", "max_tokens": 2})

    r = wait_until(lambda: (r := unnamed()).status_code == 200 and r, 10, "a request without model answered")
    assert r.headers["x-ernie-instance"] in mesh.ids("alpha")
    assert r.json()["model"] == "alpha"
