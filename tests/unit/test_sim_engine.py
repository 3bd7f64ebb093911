"""The SIMULATED engine in-process: wire shapes, token counts, 400s, metrics, faults, shutdown.

Plain requests go through httpx.ASGITransport; requests whose timing matters (hang, abort, client
gone) go through a raw ASGI driver that shows exactly which messages the app sent and when.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.sim.app import build_app
from agent.sim.engine import EngineConfig, SimEngine
from agent.sim.faults import Fault, FaultError, FaultMode, parse_fault
from agent.sim.protocol import continuation_index

pytestmark = pytest.mark.timeout(30)

MODEL = "sim-model"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "say something please"}]
NOTHING_S = 0.3  # how long we watch for a message that must not come


def make(token_delay_ms: float = 0.0, **kw: Any) -> tuple[SimEngine, Any, list[str]]:
    crashes: list[str] = []
    engine = SimEngine(EngineConfig(name="sim-test", model=MODEL, token_delay_ms=token_delay_ms, **kw))
    return engine, build_app(engine, on_crash=lambda: crashes.append("crash")), crashes


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric_values(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}")
            out[key] = s.value
    return out


class AsgiCall:
    """One request driven at the ASGI level: every message the app sends lands in `sent`."""

    def __init__(self, app: Any, path: str, body: Any, method: str = "POST") -> None:
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._body = json.dumps(body).encode() if body is not None else b""
        self._body_given = False
        self._gone = asyncio.Event()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": b"", "headers": [(b"host", b"sim"), (b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 50000), "server": ("sim", 80)}
        self.task = asyncio.create_task(app(scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        if not self._body_given:
            self._body_given = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        await self.sent.put(message)

    def disconnect(self) -> None:
        self._gone.set()

    async def next(self, timeout_s: float = 5.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.sent.get(), timeout_s)

    async def expect_nothing(self, for_s: float = NOTHING_S) -> None:
        with pytest.raises(asyncio.TimeoutError):
            message = await asyncio.wait_for(self.sent.get(), for_s)
            pytest.fail(f"unexpected message {message!r}")

    async def rest(self, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """All messages until the body ends."""
        out = []
        while True:
            m = await self.next(timeout_s)
            out.append(m)
            if m["type"] == "http.response.body" and not m.get("more_body", False):
                return out


def body_text(messages: list[dict[str, Any]]) -> str:
    return b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body").decode()


def content_chunks(events: list[Any]) -> list[str]:
    out = []
    for e in events:
        if e == "[DONE]" or not e["choices"]:
            continue
        c = e["choices"][0]
        text = c["delta"].get("content") if "delta" in c else c["text"]
        if text:
            out.append(text)
    return out


# --- shapes and token counts ------------------------------------------------------------------------

def test_chat_non_streaming_shape_and_usage():
    _, app, _ = make()

    async def go():
        async with client(app) as c:
            return await c.post(CHAT, json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5})

    r = run(go)
    assert r.status_code == 200
    assert r.headers["x-sim-engine"] == "sim-test"
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4"}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


@pytest.mark.parametrize("max_tokens, ignore_eos, tokens, finish", [
    (None, False, 16, "length"),  # default max_tokens 16 = the natural length: EOS never reached
    (5, False, 5, "length"),
    (16, False, 16, "length"),
    (17, False, 16, "stop"),
    (100, False, 16, "stop"),
    (40, True, 40, "length"),
])
def test_completion_lengths_and_finish_reasons(max_tokens, ignore_eos, tokens, finish):
    _, app, _ = make()
    payload: dict[str, Any] = {"model": MODEL, "prompt": "once upon", "ignore_eos": ignore_eos}
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens

    async def go():
        async with client(app) as c:
            return await c.post(COMPLETIONS, json=payload)

    body = run(go).json()
    choice = body["choices"][0]
    assert body["object"] == "text_completion"
    assert choice["text"] == " ".join(f"tok{i}" for i in range(tokens))
    assert choice["finish_reason"] == finish
    assert body["usage"]["completion_tokens"] == tokens
    assert body["usage"]["prompt_tokens"] == 2


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_streaming_chunks_equal_usage(path):
    _, app, _ = make()
    payload: dict[str, Any] = {"model": MODEL, "max_tokens": 23, "ignore_eos": True, "stream": True,
                               "stream_options": {"include_usage": True}}
    payload.update({"messages": MESSAGES} if path == CHAT else {"prompt": "hello"})

    async def go():
        async with client(app) as c:
            return await c.post(path, json=payload)

    r = run(go)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-sim-engine"] == "sim-test"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage_event = events[-2]
    assert usage_event["choices"] == [] and usage_event["usage"]["completion_tokens"] == 23
    finish = events[-3]["choices"][0]
    assert finish["finish_reason"] == "length"
    chunks = content_chunks(events)
    assert len(chunks) == 23
    assert "".join(chunks) == " ".join(f"tok{i}" for i in range(23))
    if path == CHAT:
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_streaming_without_include_usage_has_no_usage():
    _, app, _ = make()

    async def go():
        async with client(app) as c:
            return await c.post(CHAT, json={"messages": MESSAGES, "max_tokens": 3, "stream": True})

    events = sse_events(run(go).text)
    assert all("usage" not in e for e in events if e != "[DONE]")
    assert len(content_chunks(events)) == 3


def test_resumed_answer_continues_where_it_stopped():
    assert continuation_index("Q: hi\nA: tok0 tok1 tok2") == 3
    assert continuation_index("Q: hi?tok0 tok1") == 2
    assert continuation_index("tok3 tok4") == 0  # not a whole answer
    assert continuation_index("plain prompt") == 0
    _, app, _ = make()

    async def go():
        async with client(app) as c:
            full = await c.post(COMPLETIONS, json={"prompt": "Q: hi\nA:", "max_tokens": 100})
            part = await c.post(COMPLETIONS, json={"prompt": "Q: hi\nA: tok0 tok1 tok2", "max_tokens": 100})
            chat = await c.post(CHAT, json={"messages": [*MESSAGES, {"role": "assistant", "content": "tok0 tok1"}],
                                            "max_tokens": 3})
            return full.json(), part.json(), chat.json()

    full, part, chat = run(go)
    assert full["choices"][0]["text"] == " ".join(f"tok{i}" for i in range(16))
    assert "tok0 tok1 tok2" + part["choices"][0]["text"] == full["choices"][0]["text"]
    assert part["choices"][0]["finish_reason"] == "stop" and part["usage"]["completion_tokens"] == 13
    assert chat["choices"][0]["message"]["content"] == " tok2 tok3 tok4"


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, raw, status, needle", [
    (CHAT, b"{not json", 400, "invalid JSON"),
    (CHAT, b"", 400, "empty request body"),
    (CHAT, b"[1, 2]", 400, "JSON object"),
    (CHAT, b'{"model": "sim-model"}', 400, "messages"),
    (CHAT, b'{"messages": "hi"}', 400, "messages"),
    (CHAT, b'{"messages": []}', 400, "messages"),
    (CHAT, b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
    (CHAT, b'{"messages": [{"role": "user", "content": 5}]}', 400, "content"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', 400, "max_tokens"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000000000}', 400, "context length"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}', 400,
     "stream=True"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "`n`"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "model": 7}', 400, "model"),
    (COMPLETIONS, b'{"model": "sim-model"}', 400, "prompt"),
    (COMPLETIONS, b'{"prompt": 42}', 400, "prompt"),
    (COMPLETIONS, b'{"prompt": ["a", "b"]}', 400, "prompt"),
    (COMPLETIONS, b'{"prompt": "x", "ignore_eos": 1}', 400, "ignore_eos"),
    (COMPLETIONS, b'{"prompt": "x", "model": "other-model"}', 404, "other-model"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}', 404, "gpt-4"),
])
def test_bad_input_is_an_openai_shaped_4xx(path, raw, status, needle):
    engine, app, _ = make()

    async def go():
        async with client(app) as c:
            return await c.post(path, content=raw, headers={"content-type": "application/json"})

    r = run(go)
    assert r.status_code == status, r.text
    assert r.headers["x-sim-engine"] == "sim-test"
    err = r.json()["error"]
    assert needle in err["message"]
    assert err["code"] == status
    assert err["type"] == ("BadRequestError" if status == 400 else "NotFoundError")
    assert "param" in err
    assert engine.stats()["by_status"] == {str(status): 1}
    assert engine.stats()["in_flight"] == 0


# --- other endpoints ------------------------------------------------------------------------------------

def test_models_health_version_and_unknown_route():
    _, app, _ = make()

    async def go():
        async with client(app) as c:
            return [await c.get(p) for p in ("/v1/models", "/health", "/version", "/no/such")] + \
                   [await c.get(CHAT)]

    models, health, version, missing, wrong_method = run(go)
    card = models.json()["data"][0]
    assert card["id"] == MODEL and card["owned_by"] == "simulated" and card["max_model_len"] == 4096
    assert health.status_code == 200 and health.content == b""
    assert version.json()["engine"] == "simulated" and "simulated" in version.json()["version"]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    for r in (models, health, version, missing, wrong_method):
        assert r.headers["x-sim-engine"] == "sim-test"


def test_metrics_have_vllm_names_and_count_tokens():
    _, app, _ = make()
    _, other_app, _ = make()  # a second app in the same process has its own registry

    async def go():
        async with client(app) as c, client(other_app) as c2:
            await c.post(CHAT, json={"messages": MESSAGES, "max_tokens": 7})
            await c.post(COMPLETIONS, json={"prompt": "a b c d", "max_tokens": 100})
            return (await c.get("/metrics")).text, (await c2.get("/metrics")).text

    text, other = run(go)
    m = metric_values(text)
    lbl = "{model_name=sim-model}"
    assert m["vllm:generation_tokens_total" + lbl] == 7 + 16
    assert m["vllm:prompt_tokens_total" + lbl] == 3 + 4
    assert m["vllm:num_requests_running" + lbl] == 0
    assert m["vllm:num_requests_waiting" + lbl] == 0
    assert m["vllm:kv_cache_usage_perc" + lbl] == 0
    assert m["vllm:time_to_first_token_seconds_count" + lbl] == 2
    assert m["vllm:inter_token_latency_seconds_count" + lbl] == 6 + 15
    assert m["vllm:request_success_total{finished_reason=length,model_name=sim-model}"] == 1
    assert m["vllm:request_success_total{finished_reason=stop,model_name=sim-model}"] == 1
    assert metric_values(other)["vllm:generation_tokens_total" + lbl] == 0


# --- faults -----------------------------------------------------------------------------------------------

def test_parse_fault_validates():
    assert parse_fault({"mode": "slow", "slow_factor": 3}) == Fault(FaultMode.SLOW, slow_factor=3.0)
    for bad, needle in [({"mode": "melt"}, "mode must be one of"), ({}, "missing field: mode"),
                        ({"mode": "error_rate", "error_rate": 1.5}, "error_rate"),
                        ({"mode": "slow", "slow_factor": 0}, "slow_factor"),
                        ({"mode": "slow", "slow_factor": "x"}, "slow_factor"),
                        ({"mode": "none", "speed": 1}, "unknown field"), ("hang", "JSON object")]:
        with pytest.raises(FaultError, match=needle):
            parse_fault(bad)


def test_fault_admin_endpoints_and_crash_callback():
    engine, app, crashes = make()

    async def go():
        async with client(app) as c:
            initial = (await c.get("/sim/fault")).json()
            set_ = await c.post("/sim/fault", json={"mode": "slow", "slow_factor": 4})
            now = (await c.get("/sim/fault")).json()
            bad = await c.post("/sim/fault", json={"mode": "explode"})
            crash = await c.post("/sim/fault", json={"mode": "crash"})
            return initial, set_, now, bad, crash

    initial, set_, now, bad, crash = run(go)
    assert initial["mode"] == "none"
    assert set_.status_code == 200 and now == {"mode": "slow", "slow_factor": 4.0, "error_rate": 0.5}
    assert bad.status_code == 400 and "explode" in bad.json()["error"]["message"]
    assert engine.fault.mode is FaultMode.SLOW  # a bad request changes nothing
    assert crash.status_code == 200 and crashes == ["crash"]


def test_error_rate_fails_exactly_that_fraction_with_json_500():
    engine, app, _ = make()
    engine.set_fault(Fault(FaultMode.ERROR_RATE, error_rate=0.25))

    async def go():
        async with client(app) as c:
            return [await c.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2}) for _ in range(12)]

    responses = run(go)
    statuses = [r.status_code for r in responses]
    assert statuses.count(500) == 3 and statuses.count(200) == 9
    err = next(r for r in responses if r.status_code == 500).json()["error"]
    assert err["type"] == "InternalServerError" and "error_rate" in err["message"]
    assert engine.stats()["by_status"] == {"200": 9, "500": 3}


def test_slow_multiplies_the_token_delay():
    engine, app, _ = make(token_delay_ms=5)
    engine.set_fault(Fault(FaultMode.SLOW, slow_factor=20))

    async def go():
        loop = asyncio.get_running_loop()
        async with client(app) as c:
            t0 = loop.time()
            r = await c.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 3})
            return r, loop.time() - t0

    r, elapsed_s = run(go)
    assert r.json()["usage"]["completion_tokens"] == 3
    assert elapsed_s >= 3 * 5 * 20 / 1000  # timers never fire early: 3 tokens x 100 ms


def test_hang_stalls_streams_in_flight_and_new_requests_while_health_and_metrics_answer():
    engine, app, _ = make(token_delay_ms=10)

    async def go():
        stream = AsgiCall(app, CHAT, {"messages": MESSAGES, "max_tokens": 30, "ignore_eos": True, "stream": True})
        seen = [await stream.next() for _ in range(3)]  # headers, role chunk, tok0
        engine.set_fault(Fault(FaultMode.HANG))
        tokens_at_hang = engine.stats()["generation_tokens_total"]
        seen += [stream.sent.get_nowait() for _ in range(stream.sent.qsize())]  # sent before the hang
        unary = AsgiCall(app, COMPLETIONS, {"prompt": "x", "max_tokens": 4})
        async with client(app) as c:
            before = metric_values((await c.get("/metrics")).text)
            await stream.expect_nothing()  # the stream is stalled
            await unary.expect_nothing()  # no headers for a non-streaming request
            health = await c.get("/health")
            after = metric_values((await c.get("/metrics")).text)
        assert len(content_chunks(sse_events(body_text(seen)))) == tokens_at_hang < 30
        assert health.status_code == 200
        lbl = "{model_name=sim-model}"
        assert after["vllm:num_requests_running" + lbl] == 2
        assert after["vllm:generation_tokens_total" + lbl] == before["vllm:generation_tokens_total" + lbl] \
            == tokens_at_hang
        engine.set_fault(Fault(FaultMode.NONE))  # recovery: both continue
        events = sse_events(body_text(seen + await stream.rest()))
        unary_msgs = await unary.rest()
        return events, unary_msgs

    events, unary_msgs = run(go)
    assert len(content_chunks(events)) == 30 and events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(content_chunks(events)) == " ".join(f"tok{i}" for i in range(30))
    assert unary_msgs[0]["status"] == 200
    assert json.loads(body_text(unary_msgs))["usage"]["completion_tokens"] == 4
    assert engine.stats()["in_flight"] == 0 and engine.stats()["completed"] == 2


def test_hang_after_headers_sends_headers_then_nothing_for_new_requests_only():
    engine, app, _ = make(token_delay_ms=5)

    async def go():
        earlier = AsgiCall(app, CHAT, {"messages": MESSAGES, "max_tokens": 10, "ignore_eos": True, "stream": True})
        assert (await earlier.next())["status"] == 200
        engine.set_fault(Fault(FaultMode.HANG_AFTER_HEADERS))
        stream = AsgiCall(app, CHAT, {"messages": MESSAGES, "max_tokens": 3, "stream": True})
        unary = AsgiCall(app, COMPLETIONS, {"prompt": "x", "max_tokens": 3})
        assert (await stream.next())["status"] == 200
        start = await unary.next()
        assert start["type"] == "http.response.start" and start["status"] == 200
        earlier_rest = await earlier.rest()  # the request in flight before the fault is unaffected
        await stream.expect_nothing()
        await unary.expect_nothing()
        engine.set_fault(Fault(FaultMode.NONE))
        return earlier_rest, await stream.rest(), await unary.rest()

    earlier_rest, stream_rest, unary_rest = run(go)
    assert len(content_chunks(sse_events(body_text(earlier_rest)))) == 10
    assert len(content_chunks(sse_events(body_text(stream_rest)))) == 3
    assert json.loads(body_text(unary_rest))["choices"][0]["text"] == "tok0 tok1 tok2"


def test_abort_all_ends_streams_and_unary_with_finish_reason_abort():
    engine, app, _ = make(token_delay_ms=10)

    async def go():
        stream = AsgiCall(app, CHAT, {"messages": MESSAGES, "max_tokens": 500, "ignore_eos": True, "stream": True,
                                      "stream_options": {"include_usage": True}})
        unary = AsgiCall(app, COMPLETIONS, {"prompt": "x", "max_tokens": 500, "ignore_eos": True})
        first = [await stream.next() for _ in range(4)]  # headers, role, tok0, tok1
        assert engine.abort_all("shutdown") == 2
        events = sse_events(body_text(first + await stream.rest()))
        unary_msgs = await unary.rest()
        async with client(app) as c:
            refused = await c.post(CHAT, json={"messages": MESSAGES})
            health = await c.get("/health")
        return events, unary_msgs, refused, health

    events, unary_msgs, refused, health = run(go)
    assert events[-1] == "[DONE]" and events[-3]["choices"][0]["finish_reason"] == "abort"
    n = len(content_chunks(events))
    assert 2 <= n < 500 and events[-2]["usage"]["completion_tokens"] == n
    assert unary_msgs[0]["status"] == 200
    body = json.loads(body_text(unary_msgs))
    assert body["choices"][0]["finish_reason"] == "abort"
    assert body["usage"]["completion_tokens"] == len(body["choices"][0]["text"].split()) < 500
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "ServiceUnavailableError"
    assert health.status_code == 503
    stats = engine.stats()
    assert stats["aborted"] == 2 and stats["in_flight"] == 0 and stats["shutting_down"] is True


def test_client_disconnect_aborts_the_request_even_when_hung():
    engine, app, _ = make(token_delay_ms=5)
    engine.set_fault(Fault(FaultMode.HANG))

    async def go():
        call = AsgiCall(app, COMPLETIONS, {"prompt": "x", "max_tokens": 5})
        await call.expect_nothing()
        assert engine.stats()["running"] == 1
        call.disconnect()
        await asyncio.wait_for(call.task, 5)

    run(go)
    stats = engine.stats()
    assert stats["aborted"] == 1 and stats["in_flight"] == 0 and stats["generation_tokens_total"] == 0


def test_requests_beyond_max_num_seqs_wait():
    engine, app, _ = make(token_delay_ms=5, max_num_seqs=1)
    engine.set_fault(Fault(FaultMode.HANG))

    async def go():
        first = AsgiCall(app, COMPLETIONS, {"prompt": "x", "max_tokens": 2})
        second = AsgiCall(app, COMPLETIONS, {"prompt": "x", "max_tokens": 2})
        await second.expect_nothing()
        async with client(app) as c:
            m = metric_values((await c.get("/metrics")).text)
        engine.set_fault(Fault(FaultMode.NONE))
        return m, await first.rest(), await second.rest()

    m, first, second = run(go)
    assert m["vllm:num_requests_running{model_name=sim-model}"] == 1
    assert m["vllm:num_requests_waiting{model_name=sim-model}"] == 1
    assert json.loads(body_text(first))["usage"]["completion_tokens"] == 2
    assert json.loads(body_text(second))["usage"]["completion_tokens"] == 2
