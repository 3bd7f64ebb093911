"""Affinity routing (issue 13): requests that share a key go to one instance, the same from every
gateway, with a load bound. Real Consul, two real gateways (Envoy + relays), four SIMULATED engines.
What a user sees is counted: which instance served (x-ernie-instance), failed requests, the share
of keys that move when an instance goes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest

from agent.catalog.base import VerdictState
from tests.integration.gateway_support import AUTH, Gateway, sim_mesh, wait_until

SERVICE = "ernie"
ENGINES = 4
SESSIONS = 48
PREFIX_CACHE_BLOCKS = 160  # 2,560 tokens per engine: about twelve 200-token system prompts
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    with sim_mesh(
        root,
        "ernie-routing-test",
        SERVICE,
        token_delay_ms=5,
        engines=ENGINES,
        engine_args=("--prefix-cache-blocks", str(PREFIX_CACHE_BLOCKS)),
    ) as m:
        second = Gateway(m.consul.address, SERVICE, root / "gw-b", name="gw-b").start()
        try:
            wait_until(
                lambda: sorted(second.endpoints()) == sorted(e.id for e in m.engines), 10, "gw-b sees every engine"
            )
            m.second = second
            yield m
        finally:
            second.cleanup()


@pytest.fixture
def fresh(mesh):
    mesh.reset()
    wait_until(lambda: all(v == "healthy" for v in mesh.second.endpoints().values()), 10, "gw-b: all healthy")
    return mesh


def ask(http: httpx.Client, url: str, session: str | None = None, messages=None, stream=False, max_tokens=2):
    body = {
        "model": "sim-model",
        "messages": messages or [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    headers = {**AUTH, **({"x-session-id": session} if session else {})}
    try:  # a reset or a timeout is a failed request, counted by the caller (threads must not raise)
        if stream:
            with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                text = r.read().decode()
                ok = r.status_code == 200 and "data: [DONE]" in text
                return ok, r.headers.get("x-ernie-instance", "")
        r = http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        return r.status_code == 200, r.headers.get("x-ernie-instance", "")
    except httpx.HTTPError as e:
        return False, f"{type(e).__name__}: {e}"


def placement(url: str, sessions: list[str]) -> dict[str, str]:
    with httpx.Client(timeout=30) as http:
        out = {}
        for s in sessions:
            ok, instance = ask(http, url, s)
            assert ok and instance, (s, instance)
            out[s] = instance
        return out


SESSION_IDS = [f"session-{i}" for i in range(SESSIONS)]


def test_a_session_sticks_to_one_instance_and_sessions_spread(fresh):
    first = placement(fresh.gateway.url, SESSION_IDS)
    again = placement(fresh.gateway.url, SESSION_IDS)
    assert first == again  # every session where it was
    shares = Counter(first.values())
    assert len(shares) == ENGINES, shares  # every engine has sessions
    assert max(shares.values()) <= SESSIONS / 2, shares


def test_two_gateways_send_a_session_to_the_same_instance(fresh):
    assert placement(fresh.gateway.url, SESSION_IDS) == placement(fresh.second.url, SESSION_IDS)


def test_the_turns_of_a_conversation_stay_together_without_a_session_header(fresh):
    system = {"role": "system", "content": "You answer in one word. " * 30}
    with httpx.Client(timeout=30) as http:
        for n in range(12):
            history = [system, {"role": "user", "content": f"question {n}"}]
            where = set()
            for turn in range(3):
                ok, instance = ask(http, fresh.gateway.url, messages=history)
                assert ok
                where.add(instance)
                history += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": f"more {turn}"}]
            ok, other_gateway = ask(http, fresh.second.url, messages=history)
            assert ok and where == {other_gateway}, (n, where, other_gateway)


def test_an_instance_killed_moves_only_its_sessions_and_loses_nothing(fresh):
    before = placement(fresh.gateway.url, SESSION_IDS)
    victim_id = Counter(before.values()).most_common(1)[0][0]
    victim = next(e for e in fresh.engines if e.id == victim_id)
    failed, done = [], []
    stop = threading.Event()

    def load(offset: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = offset
            while not stop.is_set():
                s = SESSION_IDS[i % SESSIONS]
                ok, _ = ask(http, fresh.gateway.url, s, stream=True, max_tokens=20)
                (done if ok else failed).append(s)
                i += 7

    threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: len(done) >= 40, 30, "load under way")
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.proc.wait(5)
    victim.set(VerdictState.CRITICAL, "process exited")  # as its engine agent would report it
    wait_until(lambda: victim_id not in fresh.gateway.endpoints(), 10, f"{victim_id} out of envoy")
    n = len(done)
    wait_until(lambda: len(done) >= n + 40, 30, "load after the kill")
    stop.set()
    for t in threads:
        t.join(30)
    assert failed == []
    after = placement(fresh.gateway.url, SESSION_IDS)
    moved = {s for s in SESSION_IDS if after[s] != before[s]}
    its_own = {s for s in SESSION_IDS if before[s] == victim_id}
    others = moved - its_own
    print(f"moved {len(moved)} of {SESSIONS}: its own {len(its_own)}, others {len(others)}")
    assert its_own <= moved and victim_id not in after.values()  # every one of its sessions moved
    # Maglev's disruption is near-minimal, not zero: a few others' keys may move with the table
    # (measured 0, 0, 0 and 1 of ~33 in four runs); ring hash moved 5 (it rescales every share)
    assert len(others) <= 0.1 * (SESSIONS - len(its_own)), others


def test_a_hot_session_spills_at_the_load_bound(fresh):
    """80 % of requests carry one session key. Without a bound its instance would carry ~80 % of
    what is in flight; with hash_balance_factor 150 no instance carries more than 1.5x the mean
    (Envoy's bound, on this gateway's Envoy's counts: its admin /clusters, one snapshot per sample)."""
    clients, samples, stop = 16, [], threading.Event()
    served, failed = Counter(), []

    def load(k: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while not stop.is_set():
                hot = (i + k) % 5 != 0
                ok, instance = ask(
                    http, fresh.gateway.url, "hot" if hot else f"cold-{k}-{i}", stream=True, max_tokens=40
                )
                if ok:
                    served[instance] += 1
                else:
                    failed.append(instance)
                i += 1

    threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:  # Envoy's own counts, one snapshot per sample
        hosts = fresh.gateway.admin.hosts("ernie")
        samples.append([int(h.get("rq_active", 0)) for h in hosts.values()])
        stop.wait(0.02)
    stop.set()
    for t in threads:
        t.join(30)
    assert failed == []
    assert len(samples) >= 5
    # Envoy's bound (bounded-load consistent hashing) at routing time: a host with up to
    # ceil(ceil((active + 1) * 1.5) / hosts) requests takes one more. A sample's own total may be
    # lower than when its requests were routed (others ended since): bound the peak by the peak.
    peak_total = max(sum(s) for s in samples)
    bound = max(math.ceil(math.ceil((peak_total + 1) * 150 / 100) / ENGINES), 1) + 1
    peak = max(max(s) for s in samples)
    assert peak <= bound < 0.8 * clients, (peak, bound, samples)  # unbounded, the hot host would take ~13
    assert sum(served.values()) > 50
    top_share = max(served.values()) / sum(served.values())
    assert top_share < 0.6, served  # the hot key's instance did not take its 80 %


def test_status_shows_each_gateways_routing_and_each_instances_share(fresh):
    placement(fresh.gateway.url, SESSION_IDS)
    placement(fresh.second.url, SESSION_IDS)

    def report():
        out = subprocess.run(
            [sys.executable, "-m", "agent", "status", "--json", "--consul", fresh.consul.address],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)
        return r if all(i["share"] is not None for i in r["instances"]) else None

    r = wait_until(report, 15, "every instance's share reported by the gateways")
    assert sorted(g["routing"] for g in r["gateways"]) == ["affinity:system"] * 2
    shares = [i["share"] for i in r["instances"]]
    assert abs(sum(shares) - 1.0) < 0.01 and max(shares) < 0.6, shares
    table = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--consul", fresh.consul.address], capture_output=True, text=True
    ).stdout
    assert "SHARE" in table and "routing affinity:system" in table


def _words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def _cache_totals(mesh) -> tuple[int, int]:
    stats = [e.stats()["prefix_cache"] for e in mesh.engines]
    return sum(s["hits"] for s in stats), sum(s["queries"] for s in stats)


def _chat_workload(http: httpx.Client, url: str, phase: str) -> None:
    """Many users of 32 system prompts (200 tokens each; the simulated tokenizer: a word a token),
    96 conversations of 2 turns, interleaved as concurrent users' are."""
    systems = [_words(f"sys{k}w", 200) for k in range(32)]
    history = {
        c: [{"role": "system", "content": systems[c % 32]}, {"role": "user", "content": _words(f"{phase}c{c}t0w", 20)}]
        for c in range(96)
    }
    for turn in range(2):
        for c in sorted(history, key=lambda c: (c * 7 + turn * 3) % 96):
            r = http.post(
                f"{url}/v1/chat/completions",
                json={"model": "sim-model", "messages": history[c], "max_tokens": 10},
                headers=AUTH,
            )
            assert r.status_code == 200, r.text
            answer = r.json()["choices"][0]["message"]["content"]
            history[c] += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": _words(f"{phase}c{c}t{turn + 1}w", 20)},
            ]


def test_affinity_at_least_doubles_the_prefix_cache_hit_rate_of_least_request(fresh, tmp_path):
    """The same workload through an affinity gateway and a least-request one (each with its own
    conversations; the system prompts are shared), on engines whose prefix cache holds about 12 of
    the 32 system prompts (PREFIX_CACHE_BLOCKS): spread over every engine, they keep evicting each
    other; by affinity each engine gets about 8. The hit rate is the simulated engines' vLLM
    counters (hit tokens / queried tokens). 32 prompts, not 8: 8 keys hashed onto 4 instances are
    lumpy (one instance may get 4 or 5 of them, more than its cache holds), which would make the
    figure depend on one hash draw (a model of this cache over 20 draws: 8 prompts gave 0.58x-2.45x,
    32 prompts 2.1x-3.8x)."""
    config = tmp_path / "least-request.toml"
    config.write_text('[routing]\nmode = "least-request"\n')
    spread = Gateway(
        fresh.consul.address, SERVICE, tmp_path / "gw-lr", name="gw-lr", extra_args=("--config", str(config))
    )
    try:
        spread.start()
        wait_until(lambda: len(spread.endpoints()) == ENGINES, 10, "gw-lr sees every engine")
        rates = {}
        with httpx.Client(timeout=30) as http:
            for name, url in (("affinity", fresh.gateway.url), ("least-request", spread.url)):
                hits0, queries0 = _cache_totals(fresh)
                _chat_workload(http, url, name)
                hits1, queries1 = _cache_totals(fresh)
                rates[name] = (hits1 - hits0) / (queries1 - queries0)
    finally:
        spread.cleanup()
    print(f"prefix-cache hit rate: {rates}")
    assert rates["affinity"] >= 2 * rates["least-request"], rates


def test_overload_queues_at_the_gateway_then_answers_503_with_retry_after(fresh, tmp_path):
    """[routing] instance_concurrency 2 on 4 instances, queue_size 4, two relay processes (each 4
    in flight, 4 waiting): of 20 simultaneous streams, 8 run, up to 8 wait at the gateway and then
    run, the others get a JSON 503 with Retry-After at once; the gateway never sends more than 8."""
    config = tmp_path / "overload.toml"
    config.write_text("[routing]\ninstance_concurrency = 2\nqueue_size = 4\nqueue_timeout_s = 20\n")
    gw = Gateway(fresh.consul.address, SERVICE, tmp_path / "gw-ol", name="gw-ol", extra_args=("--config", str(config)))
    try:
        gw.start()
        wait_until(lambda: len(gw.endpoints()) == ENGINES, 10, "gw-ol sees every engine")
        results, peak, stop = [], [0], threading.Event()

        def one(i: int) -> None:
            with httpx.Client(timeout=60) as http:
                body = {
                    "model": "sim-model",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 200,
                    "ignore_eos": True,
                }
                headers = {**AUTH, "x-session-id": f"overload-{i}"}
                r = http.post(f"{gw.url}/v1/chat/completions", json={**body, "stream": True}, headers=headers)
                results.append((r.status_code, r.headers.get("retry-after"), r.text))

        def sample() -> None:
            while not stop.is_set():
                # what this gateway's Envoy sends the engines (the engines' own counters lag a
                # finished request's by a moment, while the relay has already let the next one go)
                peak[0] = max(peak[0], sum(int(h.get("rq_active", 0)) for h in gw.admin.hosts("ernie").values()))
                stop.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stop.set()
        sampler.join(10)
    finally:
        gw.cleanup()
    ok = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 503]
    assert len(ok) + len(busy) == 20, [r[:2] for r in results]
    assert len(ok) >= 12 and all("data: [DONE]" in r[2] for r in ok), [r[:2] for r in results]
    assert busy and all(r[1] and int(r[1]) >= 1 for r in busy), (peak, [r[:2] for r in results])
    assert all(json.loads(r[2])["error"]["code"] == "overloaded" for r in busy)
    assert 1 <= peak[0] <= 2 * ENGINES, peak
