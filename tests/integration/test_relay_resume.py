"""Nothing lost in flight: the resuming relay under engine failures. Real Consul, real Envoy, the
gateway's relay processes, three SIMULATED engines whose greedy output is deterministic
("tok0 tok1 ..."), so every answer can be checked word for word. Each test counts what a user
sees: failed requests, truncated or altered answers, seconds waited."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from agent.catalog.base import VerdictState
from tests.integration.gateway_support import AUTH, TEST_API_KEY, sim_mesh, wait_until

SERVICE = "ernie"
TOKEN_DELAY_MS = 20
MAX_TOKENS = 40  # ~0.8 s per request: long enough to be cut mid-stream
CLIENTS = 20  # half of them streaming
PROMPT_OF_DEATH = "PROMPT-OF-DEATH"  # the simulated engines crash on it before answering
pytestmark = pytest.mark.timeout(180)


def expected_text(n: int) -> str:
    return " ".join(f"tok{i}" for i in range(n))


@dataclass
class Outcome:
    stream: bool
    ok: bool
    text: str = ""
    finish: str | None = None
    usage: int | None = None
    error: str = ""
    started: float = 0.0
    ended: float = 0.0
    max_gap_s: float = 0.0
    instances: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)


def ask(client: openai.OpenAI, stream: bool, max_tokens: int = MAX_TOKENS) -> Outcome:
    kwargs = dict(
        model="sim-model",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    out = Outcome(stream, False, started=time.monotonic())
    try:
        if stream:
            last = time.monotonic()
            parts = []
            for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
                now = time.monotonic()
                out.max_gap_s, last = max(out.max_gap_s, now - last), now
                out.ids.add(chunk.id)
                for c in chunk.choices:
                    parts.append(c.delta.content or "")
                    if c.finish_reason:
                        out.finish = c.finish_reason
                        out.instances = (chunk.model_extra or {}).get("ernie_instances", [])
                if chunk.usage is not None:
                    out.usage = chunk.usage.completion_tokens
            out.text = "".join(parts)
        else:
            r = client.chat.completions.create(**kwargs)
            out.ids.add(r.id)
            out.text, out.finish = r.choices[0].message.content, r.choices[0].finish_reason
            out.usage = r.usage.completion_tokens
            out.instances = (r.model_extra or {}).get("ernie_instances", [])
    except openai.APIError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.ended = time.monotonic()
    out.ok = (
        not out.error
        and out.finish == "length"
        and out.usage == max_tokens
        and out.text == expected_text(max_tokens)
        and len(out.ids) == 1
    )
    return out


class Load:
    """CLIENTS threads with their own openai clients, half streaming, back to back until stopped."""

    def __init__(self, base_url: str, clients: int = CLIENTS):
        self.base_url = base_url
        self.clients = clients
        self.results: list[Outcome] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)
        return self.results

    def _run(self, stream: bool) -> None:
        with openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=60) as c:
            while not self.stop_event.is_set():
                r = ask(c, stream)
                with self.lock:
                    self.results.append(r)

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def wait_for_more(self, n: int, timeout_s: float = 30) -> None:
        target = self.count() + n
        wait_until(lambda: self.count() >= target, timeout_s, f"{n} more completed requests")


def bad(results: list[Outcome]) -> str:
    failed = [r for r in results if not r.ok]
    return f"{len(failed)} of {len(results)} not ok; first: " + "; ".join(
        f"{'stream' if r.stream else 'unary'} finish={r.finish} usage={r.usage} ids={len(r.ids)} "
        f"err={r.error!r} text={r.text[-40:]!r}"
        for r in failed[:4]
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("relay")
    with sim_mesh(
        root, "ernie-relay-test", SERVICE, TOKEN_DELAY_MS, engine_args=("--crash-on-prompt", PROMPT_OF_DEATH)
    ) as m:
        wait_until(lambda: m.gateway.metric("ernie_gateway_xds_streams") >= 3, 10, "envoy and two relays on xDS")
        yield m


@pytest.fixture
def fresh(mesh):
    mesh.reset()
    return mesh


def test_kill_mid_stream_loses_nothing(fresh):
    with Load(fresh.gateway.url) as load:
        load.wait_for_more(CLIENTS)
        # a moment when one engine carries at least two streams (on a loaded machine the load may
        # be thin at any one sample): the kill must hit requests in flight
        victim = wait_until(
            lambda: next((e for e in [fresh.busiest()] if e.stats()["in_flight"] >= 2), None),
            20,
            "an engine with two requests in flight",
            interval_s=0.01,
        )
        in_flight = victim.stats()["in_flight"]
        os.kill(victim.proc.pid, signal.SIGKILL)
        load.wait_for_more(3 * CLIENTS)
    results = load.results
    assert in_flight >= 2, "the kill should hit requests in flight"
    assert all(r.ok for r in results), bad(results)
    resumed = [r for r in results if len(r.instances) > 1]
    assert resumed, "some requests were on the killed engine and must have been continued elsewhere"
    assert all(r.instances[0] == victim.id and victim.id not in r.instances[1:] for r in resumed)
    assert {r.stream for r in resumed} == {True, False}, "streaming and non-streaming requests both resume"
    assert fresh.gateway.metric("ernie_gateway_relay_resumes_total", 'outcome="ok",reason="engine_lost"') >= len(
        resumed
    )


def test_hung_engine_gives_its_requests_back(fresh):
    """/health stays 200 but nothing is generated; the verdict (here set as the engine agent would)
    removes the instance and the relay moves every stalled request at once."""
    with Load(fresh.gateway.url) as load:
        load.wait_for_more(CLIENTS)
        victim = fresh.busiest()
        victim.proc.set_fault("hang")
        hung_at = time.monotonic()
        wait_until(lambda: victim.stats()["in_flight"] >= 1, 5, "requests stalled on the hung engine")
        detect_s = 1.0  # the engine agent's detection, simulated: critical one second later
        wait_until(lambda: time.monotonic() - hung_at >= detect_s, 2, "detection delay", interval_s=0.05)
        victim.set(VerdictState.CRITICAL, "hung: canary generation failed")
        load.wait_for_more(3 * CLIENTS)
    results = load.results
    assert all(r.ok for r in results), bad(results)
    around = [r for r in results if r.started <= hung_at <= r.ended]
    assert any(len(r.instances) > 1 for r in around), "requests on the hung engine were continued elsewhere"
    longest = max(r.max_gap_s if r.stream else (r.ended - r.started) for r in around)
    assert longest <= detect_s + 2.0, f"a request waited {longest:.2f}s (detection {detect_s}s + 2 s allowed)"
    assert victim.stats()["in_flight"] == 0, "the rescued requests' connections to the hung engine were closed"


def test_requests_still_flowing_stay_on_an_instance_that_leaves_the_snapshot(fresh):
    """An instance can turn critical while its engine serves on (its engine agent died and the TTL
    expired): requests that are flowing are not moved, only new ones go elsewhere."""
    with Load(fresh.gateway.url) as load:
        load.wait_for_more(CLIENTS)
        victim = fresh.busiest()
        victim.set(VerdictState.CRITICAL, "TTL expired")
        left_at = time.monotonic()
        load.wait_for_more(2 * CLIENTS)
    assert all(r.ok for r in load.results), bad(load.results)
    on_victim = [r for r in load.results if r.started < left_at < r.ended and r.instances[:1] == [victim.id]]
    assert on_victim, "requests were in flight on the instance when it left"
    assert all(r.instances == [victim.id] for r in on_victim), "flowing requests were moved needlessly"


def test_sigterm_without_drain_abort_chunks_are_resumed(fresh):
    """vLLM with --shutdown-timeout 0 answers SIGTERM with finish_reason "abort": the relay continues."""
    with Load(fresh.gateway.url) as load:
        load.wait_for_more(CLIENTS)
        victim = fresh.busiest()
        victim.proc.proc.send_signal(signal.SIGTERM)
        victim.proc.proc.wait(10)
        load.wait_for_more(3 * CLIENTS)
    assert all(r.ok for r in load.results), bad(load.results)
    assert fresh.gateway.metric("ernie_gateway_relay_resumes_total", 'outcome="ok",reason="abort"') >= 1


def test_a_killed_relay_is_restarted_and_new_requests_flow(fresh):
    gw = fresh.gateway
    pids_before = {int(p.read_text().split('"pid": ')[1].split(",")[0]) for p in gw.run_dir.glob("relay-*.json")}
    assert len(pids_before) == 2
    victim_pid = min(pids_before)
    restarts = gw.metric("ernie_gateway_relay_restarts_total")
    with Load(gw.url, clients=6) as load:
        load.wait_for_more(6)
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: gw.metric("ernie_gateway_relay_restarts_total") > restarts, 10, "relay restarted")
        load.wait_for_more(12)
    # Streams the killed relay carried end at the client (its connection to Envoy is gone); every
    # request that started after the kill succeeds.
    after = [r for r in load.results if r.started > killed_at]
    assert after and all(r.ok for r in after), bad(after)
    cut = [r for r in load.results if not r.ok]
    assert all(r.started <= killed_at for r in cut)


class StreamReader(threading.Thread):
    """One long streaming request read in the background; `chunks` counts content chunks read."""

    def __init__(self, base_url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.base_url, self.max_tokens = base_url, max_tokens
        self.chunks = 0
        self.text = ""
        self.error: openai.APIError | None = None

    def run(self) -> None:
        with openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=60) as c:
            try:
                for chunk in c.chat.completions.create(
                    model="sim-model",
                    messages=[{"role": "user", "content": "hello"}],
                    max_tokens=self.max_tokens,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                    stream=True,
                ):
                    if chunk.choices and chunk.choices[0].delta.content:
                        self.text += chunk.choices[0].delta.content
                        self.chunks += 1
            except openai.APIError as e:
                self.error = e


def serving(mesh, but: tuple = ()):
    """The running engine (not in `but`) that has a request in flight, or None."""
    return next((e for e in mesh.engines if e.running and e not in but and e.stats()["in_flight"] >= 1), None)


def test_resume_limit_ends_with_an_error_event_not_a_cut(fresh):
    """A request whose engines keep dying under it (a prompt of death) takes at most one more engine,
    then the client gets a clear error event. The engines are killed while they serve it, whatever
    pace the client reads at (the stream is long: 1,000 tokens, 20 s)."""
    reader = StreamReader(fresh.gateway.url, max_tokens=1000)
    reader.start()
    wait_until(lambda: reader.chunks >= 5 or not reader.is_alive(), 15, "5 chunks read")
    first = wait_until(lambda: serving(fresh), 5, "the engine serving the stream")
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.proc.wait(5)
    second = wait_until(lambda: serving(fresh, but=(first,)), 15, "the engine it resumed on")
    os.kill(second.proc.pid, signal.SIGKILL)
    second.proc.proc.wait(5)
    reader.join(30)
    assert not reader.is_alive()
    assert reader.error is not None, f"the stream ended without an error after {reader.chunks} chunks"
    assert "cut on 2 instances" in str(reader.error)
    assert fresh.gateway.metric("ernie_gateway_relay_resumes_total", 'outcome="limit",reason="engine_lost"') >= 1


def test_an_unreachable_instance_is_no_crash_the_request_moves_on(fresh):
    """A continuation sent to an instance whose connection fails (its host cut off, its port closed,
    and not yet out of the catalog) never reached an engine: it is no prompt of death. The request
    continues on the next instance, though one engine already died under it (before: "cut on 2
    instances", seen in the Ansible partition drill)."""
    a, b, c = fresh.engines
    c.set(VerdictState.DRAINING, "test: out of the picks for now")
    wait_until(lambda: "draining" in fresh.gateway.endpoints()[c.id], 5, f"{c.id} draining in envoy")
    unreachable_before = fresh.gateway.metric("ernie_gateway_relay_unreachable_attempts_total")
    reader = StreamReader(fresh.gateway.url, max_tokens=300)
    reader.start()
    wait_until(lambda: reader.chunks >= 5 or not reader.is_alive(), 15, "5 chunks read")
    victim = wait_until(lambda: serving(fresh), 5, "the engine serving the stream")
    idle = b if victim is a else a
    os.kill(idle.proc.pid, signal.SIGKILL)  # dead, still passing in Consul: its port refuses
    idle.proc.proc.wait(5)
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.proc.wait(5)
    wait_until(
        lambda: (
            fresh.gateway.metric("ernie_gateway_relay_unreachable_attempts_total") > unreachable_before
            or not reader.is_alive()
        ),
        15,
        "the continuation sent to the dead instance",
    )
    c.set(VerdictState.PASSING)  # now the request has somewhere to go
    reader.join(30)
    assert not reader.is_alive()
    assert reader.error is None, str(reader.error)
    assert reader.text == expected_text(300)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("resumable", [True, False])
def test_a_prompt_of_death_takes_at_most_one_more_engine(fresh, stream, resumable):
    """A request that crashes every engine it reaches (before it answers) must not take the fleet
    down: Envoy's retries and the relay's resumes together try it on at most one more engine."""
    extra = {} if resumable else {"logprobs": True}  # not resumable: relayed as it is
    with openai.OpenAI(base_url=f"{fresh.gateway.url}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=30) as c:
        with pytest.raises(openai.APIError) as err:
            r = c.chat.completions.create(
                model="sim-model",
                messages=[{"role": "user", "content": PROMPT_OF_DEATH}],
                max_tokens=5,
                stream=stream,
                extra_body=extra,
            )
            if stream:
                list(r)
    crashed = [e for e in fresh.engines if not e.running]
    assert 1 <= len(crashed) <= 2, f"{len(crashed)} engines crashed on one request ({err.value})"
    # Their engine agents would report them at once (process exited); these engines have none.
    for e in crashed:
        e.set(VerdictState.CRITICAL, "process exited")
        wait_until(lambda e=e: e.id not in fresh.gateway.endpoints(), 5, f"{e.id} removed from envoy")
    with openai.OpenAI(base_url=f"{fresh.gateway.url}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=30) as c:
        ok = ask(c, stream=True, max_tokens=5)
    assert ok.ok, ok.error  # the surviving engine(s) serve on


def test_client_disconnect_cancels_the_engine_request(fresh):
    with httpx.stream(
        "POST",
        f"{fresh.gateway.url}/v1/chat/completions",
        timeout=10,
        headers=AUTH,
        json={
            "model": "sim-model",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 500,
            "ignore_eos": True,
            "stream": True,
        },
    ) as r:
        served_by = r.headers["x-ernie-instance"]
        for i, _line in enumerate(r.iter_lines()):
            if i >= 5:
                break
    engine = next(e for e in fresh.engines if e.id == served_by)
    wait_until(lambda: engine.stats()["in_flight"] == 0, 5, "the engine's request cancelled after the client left")
    assert engine.stats()["aborted"] >= 1


def test_bad_input_is_a_4xx_passed_through_and_nothing_is_resumed(fresh):
    before = fresh.gateway.metric("ernie_gateway_relay_resumes_total", 'outcome="ok",reason="engine_lost"')
    r = httpx.post(
        f"{fresh.gateway.url}/v1/chat/completions",
        content=b"{not json",
        timeout=10,
        headers={"content-type": "application/json", **AUTH},
    )
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(
        f"{fresh.gateway.url}/v1/chat/completions",
        timeout=10,
        headers=AUTH,
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    # an unknown model: the OpenAI 404, from the gateway (it knows the served models); no engine sees it
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model", err
    assert err["type"] == "invalid_request_error" and "sim-model" in err["message"]
    r = httpx.get(f"{fresh.gateway.url}/v1/chat/completions", timeout=10, headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert fresh.gateway.metric("ernie_gateway_relay_resumes_total", 'outcome="ok",reason="engine_lost"') == before
