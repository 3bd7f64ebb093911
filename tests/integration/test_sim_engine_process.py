"""The SIMULATED engine as a real subprocess (`python -m agent sim-engine`): the official OpenAI client,
the hang gray failure, vLLM's SIGTERM behaviours, SIGKILL, crash, start-up errors, the CLI."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from typing import Any
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.local.ports import free_port, port_open
from agent.sim.process import SimEngineError, SimEngineProcess

pytestmark = pytest.mark.timeout(60)

EXIT_TIMEOUT_S = 10.0
NOTHING_S = 0.5  # how long we watch for a token that must not come
LBL = {"model_name": "sim-model"}
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def sims(tmp_path) -> Iterator[Any]:
    started: list[SimEngineProcess] = []

    def start(**kw: Any) -> SimEngineProcess:
        port = free_port()
        sim = SimEngineProcess(port, log_path=str(tmp_path / f"sim-{port}.log"), **kw)
        started.append(sim)
        return sim.start()

    yield start
    for sim in started:
        sim.stop()


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == LBL:
                return s.value
    raise AssertionError(f"{name} not in /metrics")


async def sse(response: httpx.Response) -> AsyncIterator[Any]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)


async def pump(events: AsyncIterator[Any], queue: asyncio.Queue[Any]) -> None:
    async for event in events:
        queue.put_nowait(event)


def content(event: Any) -> str:
    if event == "[DONE]" or not event["choices"]:
        return ""
    return event["choices"][0]["delta"].get("content") or ""


def finish_reason(events: list[Any]) -> str | None:
    reasons = [e["choices"][0]["finish_reason"] for e in events if e != "[DONE]" and e["choices"]]
    return next((r for r in reasons if r), None)


def test_openai_client_streaming_and_plain(sims):
    sim = sims(token_delay_ms=2, name="sim-a")
    client = openai.OpenAI(base_url=f"{sim.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="sim-model",
        messages=MESSAGES,
        max_tokens=37,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks, finish, usage = [], None, None
    for event in stream:
        if event.choices:
            if event.choices[0].delta.content:
                chunks.append(event.choices[0].delta.content)
            finish = event.choices[0].finish_reason or finish
        if event.usage:
            usage = event.usage
    assert len(chunks) == 37 == usage.completion_tokens
    assert finish == "length"
    assert "".join(chunks).split() == [f"tok{i}" for i in range(37)]

    raw = client.chat.completions.with_raw_response.create(model="sim-model", messages=MESSAGES)
    assert raw.headers["x-sim-engine"] == "sim-a"
    answer = raw.parse()
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 16
    assert [m.owned_by for m in client.models.list()] == ["simulated"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="sim-model", prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-served", prompt="x")
    assert sim.stats()["by_status"] == {"200": 2, "400": 1, "404": 1}


def test_hang_is_a_gray_failure_then_recovers(sims):
    sim = sims(token_delay_ms=20, allow_faults=True)

    async def go() -> None:
        async with httpx.AsyncClient(base_url=sim.url, timeout=10) as c:
            body = {"messages": MESSAGES, "max_tokens": 40, "ignore_eos": True, "stream": True}
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                # A reader task of its own: cancelling an httpx read would close the connection.
                queue: asyncio.Queue[Any] = asyncio.Queue()
                reader = asyncio.create_task(pump(sse(r), queue))
                seen = [await asyncio.wait_for(queue.get(), 5) for _ in range(3)]  # role, tok0, tok1
                assert (await c.post("/sim/fault", json={"mode": "hang"})).status_code == 200
                first = (await c.get("/metrics")).text
                seen += [queue.get_nowait() for _ in range(queue.qsize())]  # sent before the hang
                with pytest.raises(asyncio.TimeoutError):  # the stream makes no progress
                    seen.append(await asyncio.wait_for(queue.get(), NOTHING_S))
                health = await c.get("/health")
                second = (await c.get("/metrics")).text
                assert health.status_code == 200
                assert metric(second, "vllm:num_requests_running") == 1
                assert metric(second, "vllm:generation_tokens_total") == metric(first, "vllm:generation_tokens_total")
                assert (await c.post("/sim/fault", json={"mode": "none"})).status_code == 200
                await asyncio.wait_for(reader, 10)
                seen += [queue.get_nowait() for _ in range(queue.qsize())]
        tokens = [content(e) for e in seen if content(e)]
        assert len(tokens) == 40 and finish_reason(seen) == "length" and seen[-1] == "[DONE]"

    asyncio.run(go())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_default_shutdown_timeout_aborts_in_flight(sims, sig):
    sim = sims(token_delay_ms=20)

    async def go() -> None:
        async with httpx.AsyncClient(base_url=sim.url, timeout=10) as c:
            unary = asyncio.create_task(
                c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1000, "ignore_eos": True})
            )
            body = {
                "messages": MESSAGES,
                "max_tokens": 1000,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                events = sse(r)
                seen = [await anext(events) for _ in range(3)]
                sim.proc.send_signal(sig)
                seen += [e async for e in events]
            done = await unary
        assert seen[-1] == "[DONE]" and finish_reason(seen) == "abort"
        tokens = [content(e) for e in seen if content(e)]
        assert 2 <= len(tokens) < 1000 and seen[-2]["usage"]["completion_tokens"] == len(tokens)
        assert done.status_code == 200
        choice = done.json()["choices"][0]
        assert choice["finish_reason"] == "abort" and 0 < len(choice["text"].split()) < 1000

    asyncio.run(go())
    assert sim.wait(EXIT_TIMEOUT_S) == 0
    assert not port_open("127.0.0.1", sim.port)


def test_sigterm_with_shutdown_timeout_lets_in_flight_finish(sims):
    sim = sims(token_delay_ms=20, shutdown_timeout_s=20)

    async def refused(c: httpx.AsyncClient) -> bool:
        try:
            return (await c.get(f"{sim.url}/health")).status_code != 200
        except httpx.TransportError:
            return True

    async def go() -> None:
        async with httpx.AsyncClient(base_url=sim.url, timeout=10) as c:
            body = {"messages": MESSAGES, "max_tokens": 100, "ignore_eos": True, "stream": True}
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                events = sse(r)
                seen = [await anext(events) for _ in range(3)]
                sim.terminate()
                async with httpx.AsyncClient(timeout=2) as probe:  # a new connection each time
                    deadline = asyncio.get_running_loop().time() + 5
                    while not await refused(probe):
                        assert asyncio.get_running_loop().time() < deadline, "still accepting after SIGTERM"
                        await asyncio.sleep(0.05)
                    assert sim.returncode is None  # draining, not gone
                seen += [e async for e in events]
        tokens = [content(e) for e in seen if content(e)]
        assert len(tokens) == 100 and finish_reason(seen) == "length"

    asyncio.run(go())
    assert sim.wait(EXIT_TIMEOUT_S) == 0


def test_kill_takes_the_process_and_its_streams_away(sims):
    sim = sims(token_delay_ms=20)

    async def go() -> None:
        async with httpx.AsyncClient(base_url=sim.url, timeout=10) as c:
            body = {"messages": MESSAGES, "max_tokens": 1000, "ignore_eos": True, "stream": True}
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                events = sse(r)
                [await anext(events) for _ in range(2)]
                sim.kill()
                with pytest.raises(httpx.TransportError):
                    [e async for e in events]

    asyncio.run(go())
    assert sim.wait(EXIT_TIMEOUT_S) == -signal.SIGKILL
    assert not port_open("127.0.0.1", sim.port)


def test_crash_fault_exits_with_code_1(sims):
    sim = sims(allow_faults=True)
    sim.set_fault("crash")
    assert sim.returncode == 1
    assert "crash" in sim.log_tail()


def test_start_fails_clearly_when_the_port_is_taken(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        sim = SimEngineProcess(busy.getsockname()[1], log_path=str(tmp_path / "sim.log"))
        with pytest.raises(SimEngineError, match="exited with code"):
            sim.start(timeout_s=20)


def test_cli_help_and_bad_arguments():
    cases = {  # args -> expected exit code (run side by side: each is a Python start-up)
        ("--help",): 0,
        (): 2,  # --port is required
        ("--port", "8000", "--fault", "melt"): 2,
        ("--port", "8000", "--token-delay-ms", "-1"): 2,
        ("--port", "8000", "--error-rate", "2"): 2,
        ("--port", "8000", "--fault", "crash"): 1,
    }
    procs = {
        args: subprocess.Popen(
            [sys.executable, "-m", "agent", "sim-engine", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in cases
    }
    out = {args: (p.communicate(timeout=30), p.returncode) for args, p in procs.items()}
    assert {args: code for args, (_, code) in out.items()} == cases
    (help_text, _), _ = out[("--help",)]
    assert "SIMULATED" in help_text and "--shutdown-timeout" in help_text and "hang_after_headers" in help_text
    assert "melt" in out[("--port", "8000", "--fault", "melt")][0][1]
    assert "error_rate" in out[("--port", "8000", "--error-rate", "2")][0][1]


def test_the_fault_endpoint_needs_allow_faults(sims):
    """Issue 11 item 6: without --allow-faults nobody can crash or hang the engine over HTTP."""
    sim = sims()
    assert httpx.post(f"{sim.url}/sim/fault", json={"mode": "crash"}, timeout=5).status_code == 404
    assert httpx.get(f"{sim.url}/sim/fault", timeout=5).status_code == 404
    assert sim.is_running() and httpx.get(f"{sim.url}/health", timeout=5).status_code == 200
    with pytest.raises(SimEngineError, match="allow_faults"):
        sim.set_fault("hang")


def test_prefix_cache_counters_after_two_chats_with_the_same_long_system_prompt(sims):
    """Through the real process and its flags: the second chat hits the system prompt's whole blocks
    (of --block-size 32), on /metrics under vLLM's names and in /sim/stats; its first token comes
    sooner (--prefill-ms-per-token 2: the cold 400-token system prompt costs >= 0.8 s). With
    --prefix-cache-blocks 0 nothing is counted."""
    system = " ".join(f"rule{i}" for i in range(400))  # 400 tokens; with the template 403 shared
    flags = ("--block-size", "32", "--prefill-ms-per-token", "2")
    on = sims(token_delay_ms=1, extra_args=flags)
    off = sims(token_delay_ms=1, extra_args=(*flags, "--prefix-cache-blocks", "0"))

    def two_chats(sim: SimEngineProcess) -> tuple[list[float], list[int]]:
        elapsed, prompt_tokens = [], []
        with httpx.Client(base_url=sim.url, timeout=30) as c:
            for user in ("hello there", "what now then"):
                messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
                r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
                assert r.status_code == 200, r.text
                elapsed.append(r.elapsed.total_seconds())
                prompt_tokens.append(r.json()["usage"]["prompt_tokens"])
        return elapsed, prompt_tokens

    (cold_s, hot_s), prompts = two_chats(on)
    text = httpx.get(f"{on.url}/metrics", timeout=5).text
    queries, hits = sum(prompts), 403 // 32 * 32  # 12 whole blocks of 32: 384 tokens
    assert metric(text, "vllm:prefix_cache_queries_total") == queries
    assert metric(text, "vllm:prefix_cache_hits_total") == hits
    assert metric(text, "vllm:prompt_tokens_total") == queries
    stats = on.stats()["prefix_cache"]
    assert (stats["queries"], stats["hits"], stats["block_size"], stats["enabled"]) == (queries, hits, 32, True)
    assert cold_s >= 0.8 and hot_s < cold_s / 2

    (cold_off_s, again_off_s), _ = two_chats(off)
    text = httpx.get(f"{off.url}/metrics", timeout=5).text
    assert metric(text, "vllm:prefix_cache_queries_total") == 0 == metric(text, "vllm:prefix_cache_hits_total")
    assert off.stats()["prefix_cache"]["enabled"] is False
    assert cold_off_s >= 0.8 and again_off_s >= 0.8
