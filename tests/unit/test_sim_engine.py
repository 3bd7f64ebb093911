"""The SIMULATED engine in-process: wire shapes, token counts, 400s, metrics, faults, shutdown.

Plain requests go through httpx.ASGITransport; requests whose timing matters (hang, abort, client
gone) go through a raw ASGI driver that shows exactly which messages the app sent and when.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from collections.abc import Awaitable, Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.sim.app import build_app
from agent.sim.engine import EngineConfig, SimEngine
from agent.sim.faults import Fault, FaultError, FaultMode, parse_fault
from agent.sim import tokens, wire
from agent.sim.protocol import continuation_index

pytestmark = pytest.mark.timeout(30)

MODEL = "sim-model"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "say something please"}]
NOTHING_S = 0.3  # how long we watch for a message that must not come


def make(token_delay_ms: float = 0.0, allow_faults: bool = True, **kw: Any) -> tuple[SimEngine, Any, list[str]]:
    crashes: list[str] = []
    engine = SimEngine(EngineConfig(name="sim-test", model=MODEL, token_delay_ms=token_delay_ms, **kw))
    return engine, build_app(engine, on_crash=lambda: crashes.append("crash"), allow_faults=allow_faults), crashes


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
        payload = block[len("data: ") :]
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
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"sim"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000),
            "server": ("sim", 80),
        }
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
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == "tok0 tok1 tok2 tok3 tok4"
    assert choice["finish_reason"] == "length" and choice["token_ids"] is None
    # <user> say something please <end_of_turn> <assistant>
    assert body["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 5,
        "total_tokens": 11,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


@pytest.mark.parametrize(
    "max_tokens, ignore_eos, tokens, finish",
    [
        (None, False, 16, "length"),  # default max_tokens 16 = the natural length: EOS never reached
        (5, False, 5, "length"),
        (16, False, 16, "length"),
        (17, False, 16, "stop"),  # 16 tokens of text, then EOS (the 17th token, no text)
        (100, False, 16, "stop"),
        (40, True, 40, "length"),
    ],
)
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
    assert body["usage"]["completion_tokens"] == tokens + (finish == "stop")
    assert body["usage"]["prompt_tokens"] == 2


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_streaming_chunks_equal_usage(path):
    _, app, _ = make()
    payload: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 23,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
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
            chat = await c.post(
                CHAT,
                json={
                    "messages": [*MESSAGES, {"role": "assistant", "content": "tok0 tok1"}],
                    "max_tokens": 3,
                    "continue_final_message": True,
                    "add_generation_prompt": False,
                },
            )
            fresh = await c.post(
                CHAT, json={"messages": [*MESSAGES, {"role": "assistant", "content": "tok0 tok1"}], "max_tokens": 3}
            )
            return full.json(), part.json(), chat.json(), fresh.json()

    full, part, chat, fresh = run(go)
    assert full["choices"][0]["text"] == " ".join(f"tok{i}" for i in range(16))
    assert "tok0 tok1 tok2" + part["choices"][0]["text"] == full["choices"][0]["text"]
    assert part["choices"][0]["finish_reason"] == "stop" and part["usage"]["completion_tokens"] == 13 + 1  # EOS
    assert chat["choices"][0]["message"]["content"] == " tok2 tok3 tok4"
    # Without continue_final_message the assistant message is closed and a new answer starts, as in vLLM.
    assert fresh["choices"][0]["message"]["content"] == "tok0 tok1 tok2"


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, raw, status, needle",
    [
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
        (
            CHAT,
            b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}',
            400,
            "stream=True",
        ),
        (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "`n`"),
        (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
        (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "model": 7}', 400, "model"),
        (COMPLETIONS, b'{"model": "sim-model"}', 400, "prompt"),
        (COMPLETIONS, b'{"prompt": 42}', 400, "prompt"),
        (COMPLETIONS, b'{"prompt": ["a", "b"]}', 400, "prompt"),
        (COMPLETIONS, b'{"prompt": "x", "ignore_eos": 1}', 400, "ignore_eos"),
        (COMPLETIONS, b'{"prompt": "x", "model": "other-model"}', 404, "other-model"),
        (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}', 404, "gpt-4"),
    ],
)
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
            return [await c.get(p) for p in ("/v1/models", "/health", "/version", "/no/such")] + [await c.get(CHAT)]

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
    assert m["vllm:generation_tokens_total" + lbl] == 7 + 17  # 16 and EOS
    assert m["vllm:prompt_tokens_total" + lbl] == 6 + 4
    assert m["vllm:num_requests_running" + lbl] == 0
    assert m["vllm:num_requests_waiting" + lbl] == 0
    assert m["vllm:kv_cache_usage_perc" + lbl] == 0
    assert m["vllm:time_to_first_token_seconds_count" + lbl] == 2
    assert m["vllm:inter_token_latency_seconds_count" + lbl] == 6 + 16
    assert m["vllm:request_success_total{finished_reason=length,model_name=sim-model}"] == 1
    assert m["vllm:request_success_total{finished_reason=stop,model_name=sim-model}"] == 1
    assert metric_values(other)["vllm:generation_tokens_total" + lbl] == 0


# --- faults -----------------------------------------------------------------------------------------------


def test_parse_fault_validates():
    assert parse_fault({"mode": "slow", "slow_factor": 3}) == Fault(FaultMode.SLOW, slow_factor=3.0)
    for bad, needle in [
        ({"mode": "melt"}, "mode must be one of"),
        ({}, "missing field: mode"),
        ({"mode": "error_rate", "error_rate": 1.5}, "error_rate"),
        ({"mode": "slow", "slow_factor": 0}, "slow_factor"),
        ({"mode": "slow", "slow_factor": "x"}, "slow_factor"),
        ({"mode": "none", "speed": 1}, "unknown field"),
        ("hang", "JSON object"),
    ]:
        with pytest.raises(FaultError, match=needle):
            parse_fault(bad)


def test_the_fault_endpoint_exists_only_with_allow_faults():
    """Issue 11 item 6: anyone who reaches /sim/fault can crash or hang the engine. Failed before
    (/sim/fault was always served: POST crash answered 200 and crashed the engine)."""
    engine, app, crashes = make(allow_faults=False)

    async def go():
        async with client(app) as c:
            return (
                await c.post("/sim/fault", json={"mode": "crash"}),
                await c.post("/sim/fault", json={"mode": "hang"}),
                await c.get("/sim/fault"),
                await c.get("/sim/stats"),
            )

    crash, hang, get, stats = run(go)
    assert (crash.status_code, hang.status_code, get.status_code) == (404, 404, 404)
    assert "no such route" in crash.json()["error"]["message"]
    assert crashes == [] and engine.fault.mode is FaultMode.NONE
    assert stats.status_code == 200  # the counters stay readable
    from agent.sim.cli import build_parser

    assert build_parser().parse_args(["--port", "1"]).allow_faults is False
    assert build_parser().parse_args(["--port", "1", "--allow-faults"]).allow_faults is True


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
        assert (
            after["vllm:generation_tokens_total" + lbl]
            == before["vllm:generation_tokens_total" + lbl]
            == tokens_at_hang
        )
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
        stream = AsgiCall(
            app,
            CHAT,
            {
                "messages": MESSAGES,
                "max_tokens": 500,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
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


# --- token IDs and resuming (what a resuming relay needs) ---------------------------------------------

# vLLM 0.32's keys per chunk (vllm/entrypoints/openai/*/serving.py, dumped with exclude_unset=True).
TOP_KEYS = {"id", "object", "created", "model", "choices"}
CHAT_FIRST_KEYS = TOP_KEYS | {"prompt_token_ids", "prompt_text"}
CHAT_FIRST_CHOICE_KEYS = {"index", "delta", "logprobs", "finish_reason"}
CHAT_CONTENT_CHOICE_KEYS = {"index", "delta", "logprobs", "finish_reason", "token_ids"}
CHAT_FINAL_CHOICE_KEYS = CHAT_CONTENT_CHOICE_KEYS | {"stop_reason"}
COMPLETION_CHOICE_KEYS = {"index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids", "token_ids"}
USAGE_CHUNK_KEYS = TOP_KEYS | {"usage", "system_fingerprint"}  # the fingerprint is on the last chunk only


def gen_ids(start: int, stop: int) -> list[int]:
    return [tokens.generated_token_id(k) for k in range(start, stop)]


def gen_text(start: int, stop: int) -> str:
    return "".join(tokens.generated_text(k, first=k == 0, leading_space=False) for k in range(start, stop))


def chat_ids(messages: list[dict[str, str]]) -> list[int]:
    return tokens.chat_prompt_ids([(m["role"], m["content"]) for m in messages], True, False)


def token_chunks(events: list[Any]) -> list[tuple[str, list[int] | None, str | None]]:
    """(text, token_ids, finish_reason) of every chunk that can carry generated tokens (not the chat role chunk)."""
    out = []
    for e in events:
        if e == "[DONE]" or not e["choices"]:
            continue
        c = e["choices"][0]
        if "delta" in c and "role" in c["delta"]:
            continue
        out.append((c["delta"]["content"] if "delta" in c else c["text"], c["token_ids"], c["finish_reason"]))
    return out


async def post(app: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    async with client(app) as c:
        return await c.post(path, json=body)


def test_tokenizer_is_deterministic_and_knows_its_own_tokens():
    assert tokens.tokenize("the cat  sat") == tokens.tokenize(" the cat sat ")
    assert len(set(tokens.tokenize("the cat sat"))) == 3
    assert tokens.tokenize("A: tok0 tok1")[1:] == gen_ids(0, 2)
    hi, tok0 = tokens.tokenize("Hi!tok0")  # an answer appended without a space: two tokens
    assert hi == tokens.tokenize("Hi!")[0] and tok0 == tokens.generated_token_id(0)
    assert all(0 <= t < tokens.VOCAB_SIZE_TOKENS for t in tokens.tokenize("x tok5 tokens 123"))
    assert len(tokens.tokenize("   ")) == 1  # whitespace alone is a token, as with a real tokenizer
    user = tokens.ROLE_TOKEN_IDS["user"]
    asst = tokens.ROLE_TOKEN_IDS["assistant"]
    eot = tokens.END_OF_TURN_TOKEN_ID
    assert tokens.chat_prompt_ids([("user", "hi")], True, False) == [user, *tokens.tokenize("hi"), eot, asst]
    assert tokens.chat_prompt_ids([("user", "hi"), ("assistant", "tok0")], False, True) == [
        user,
        *tokens.tokenize("hi"),
        eot,
        asst,
        tokens.generated_token_id(0),
    ]
    assert tokens.continuation_index([user, *gen_ids(0, 4)]) == 4
    assert tokens.continuation_index(gen_ids(2, 5)) == 0  # not a whole answer
    assert tokens.continuation_index([*gen_ids(0, 3), *gen_ids(0, 2)]) == 2
    assert tokens.continuation_index([user, asst]) == 0


@pytest.mark.parametrize("return_token_ids", [False, True])
def test_chat_stream_shape_with_and_without_token_ids(return_token_ids):
    _, app, _ = make()
    body = {
        "messages": MESSAGES,
        "max_tokens": 20,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": return_token_ids,
    }
    r = run(lambda: post(app, CHAT, body))
    events = sse_events(r.text)
    first, *content, final, usage_event, done = events
    assert done == "[DONE]" and len(content) == 16  # tok0..tok15, then EOS in the final chunk
    assert set(first) == CHAT_FIRST_KEYS and set(first["choices"][0]) == CHAT_FIRST_CHOICE_KEYS
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["prompt_text"] is None
    assert first["prompt_token_ids"] == (chat_ids(MESSAGES) if return_token_ids else None)
    for k, e in enumerate(content):
        assert set(e) == TOP_KEYS and set(e["choices"][0]) == CHAT_CONTENT_CHOICE_KEYS, e
        assert e["choices"][0]["delta"] == {"content": tokens.generated_text(k, k == 0, False)}
        assert e["choices"][0]["token_ids"] == (gen_ids(k, k + 1) if return_token_ids else None)
    assert set(final) == TOP_KEYS and set(final["choices"][0]) == CHAT_FINAL_CHOICE_KEYS
    choice = final["choices"][0]
    assert (choice["delta"], choice["finish_reason"], choice["stop_reason"]) == ({"content": ""}, "stop", None)
    assert choice["token_ids"] == ([tokens.EOS_TOKEN_ID] if return_token_ids else None)
    assert set(usage_event) == USAGE_CHUNK_KEYS and usage_event["choices"] == []
    assert usage_event["system_fingerprint"] == wire.SYSTEM_FINGERPRINT
    assert usage_event["usage"] == {"prompt_tokens": 6, "total_tokens": 6 + 17, "completion_tokens": 17}
    if not return_token_ids:  # vLLM writes the unset-but-passed field as null
        assert r.text.count('"token_ids":null') == 17 and r.text.count('"prompt_token_ids":null') == 1


@pytest.mark.parametrize("return_token_ids", [False, True])
def test_completion_stream_shape_with_and_without_token_ids(return_token_ids):
    _, app, _ = make()
    body = {
        "prompt": "once upon a time",
        "max_tokens": 5,
        "stream": True,
        "return_token_ids": return_token_ids,
        "stream_options": {"include_usage": True},
    }
    r = run(lambda: post(app, COMPLETIONS, body))
    *chunks, usage_event, done = sse_events(r.text)
    assert done == "[DONE]" and len(chunks) == 5  # the last token rides with finish_reason "length"
    for k, e in enumerate(chunks):
        c = e["choices"][0]
        assert set(e) == TOP_KEYS and set(c) == COMPLETION_CHOICE_KEYS, e
        assert e["object"] == "text_completion" and c["text"] == tokens.generated_text(k, k == 0, False)
        assert c["finish_reason"] == ("length" if k == 4 else None) and c["stop_reason"] is None
        assert c["token_ids"] == (gen_ids(k, k + 1) if return_token_ids else None)
        want_prompt = tokens.tokenize("once upon a time") if return_token_ids and k == 0 else None
        assert c["prompt_token_ids"] == want_prompt
    assert usage_event["usage"] == {"prompt_tokens": 4, "total_tokens": 9, "completion_tokens": 5}
    assert set(usage_event) == USAGE_CHUNK_KEYS
    if not return_token_ids:
        assert r.text.count('"token_ids":null') == 5 and r.text.count('"prompt_token_ids":null') == 5


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_non_streaming_token_ids_sit_where_vllm_puts_them(kind):
    _, app, _ = make()
    path, body = (CHAT, {"messages": MESSAGES}) if kind == "chat" else (COMPLETIONS, {"prompt": "once upon"})
    plain = run(lambda: post(app, path, {**body, "max_tokens": 3})).json()
    with_ids = run(lambda: post(app, path, {**body, "max_tokens": 3, "return_token_ids": True})).json()
    prompt_ids = chat_ids(MESSAGES) if kind == "chat" else tokens.tokenize("once upon")
    assert set(plain) == set(with_ids) and set(plain["choices"][0]) == set(with_ids["choices"][0])
    assert with_ids["choices"][0]["token_ids"] == gen_ids(0, 3) and plain["choices"][0]["token_ids"] is None
    if kind == "chat":  # top level in a chat answer ...
        assert with_ids["prompt_token_ids"] == prompt_ids and plain["prompt_token_ids"] is None
        assert "prompt_token_ids" not in with_ids["choices"][0]
    else:  # ... inside the choice in a completion
        assert with_ids["choices"][0]["prompt_token_ids"] == prompt_ids
        assert plain["choices"][0]["prompt_token_ids"] is None and "prompt_token_ids" not in with_ids
    assert with_ids["usage"]["prompt_tokens"] == len(prompt_ids)
    assert plain["system_fingerprint"] == wire.SYSTEM_FINGERPRINT


@pytest.mark.parametrize("path, start", [(CHAT, {"messages": MESSAGES}), (COMPLETIONS, {"prompt": "once"})])
def test_without_a_usage_chunk_the_final_chunk_carries_the_system_fingerprint(path, start):
    _, app, _ = make()
    events = sse_events(run(lambda: post(app, path, {**start, "max_tokens": 3, "stream": True})).text)
    *chunks, final, done = events
    assert done == "[DONE]" and final["choices"][0]["finish_reason"] == "length"
    assert final["system_fingerprint"] == wire.SYSTEM_FINGERPRINT
    assert all("system_fingerprint" not in e and "usage" not in e for e in chunks)


async def cut_stream(app: Any, path: str, body: dict[str, Any], keep_tokens: int) -> list[Any]:
    """Events of a stream whose client goes away once `keep_tokens` generated tokens arrived."""
    call = AsgiCall(app, path, body)
    assert (await call.next())["status"] == 200
    received = ""
    while True:
        received += (await call.next())["body"].decode()
        events = sse_events(received)
        if len(token_chunks(events)) >= keep_tokens:
            break
    call.disconnect()
    await asyncio.wait_for(call.task, 5)
    return events


@pytest.mark.parametrize("ignore_eos, keep", [(False, 1), (False, 7), (False, 16), (True, 1), (True, 7), (True, 19)])
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_cut_stream_continued_by_token_ids_is_the_undisturbed_run(kind, ignore_eos, keep):
    engine, app, _ = make(token_delay_ms=1)
    max_tokens = 20
    start: dict[str, Any] = {"messages": MESSAGES} if kind == "chat" else {"prompt": "Q: what next?\nA:"}
    path = CHAT if kind == "chat" else COMPLETIONS
    body = {
        **start,
        "max_tokens": max_tokens,
        "ignore_eos": ignore_eos,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }

    async def go():
        full = sse_events((await post(app, path, body)).text)
        cut = await cut_stream(app, path, body, keep)
        return full, cut

    full, cut = run(go)
    prompt_ids = full[0]["prompt_token_ids"] if kind == "chat" else full[0]["choices"][0]["prompt_token_ids"]
    whole = token_chunks(full)
    got = token_chunks(cut)[:keep]
    assert got == whole[:keep]  # the cut stream was the same run up to the cut
    generated = [t for _, ids, _ in got for t in ids]

    resumed = {
        "prompt": prompt_ids + generated,
        "max_tokens": max_tokens - keep,
        "ignore_eos": ignore_eos,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    rest_events = sse_events(run(lambda: post(app, COMPLETIONS, resumed)).text)
    rest = token_chunks(rest_events)
    assert [(t, ids) for t, ids, _ in rest] == [(t, ids) for t, ids, _ in whole[keep:]]
    assert rest[-1][2] == whole[-1][2] == ("length" if ignore_eos else "stop")
    assert "".join(t for t, _, _ in got + rest) == "".join(t for t, _, _ in whole)
    assert "".join(t for t, _, _ in whole) == gen_text(0, max_tokens if ignore_eos else 16)
    assert rest_events[0]["choices"][0]["prompt_token_ids"] == prompt_ids + generated
    full_usage, rest_usage = full[-2]["usage"], rest_events[-2]["usage"]
    assert rest_usage["prompt_tokens"] == len(prompt_ids) + keep
    assert rest_usage["completion_tokens"] == full_usage["completion_tokens"] - keep == len(rest)
    assert engine.stats()["aborted"] == 1  # the cut one


@pytest.mark.parametrize("keep", [1, 9])
def test_a_cut_chat_continued_as_its_final_message_is_the_undisturbed_run(keep):
    _, app, _ = make()
    body = {"messages": MESSAGES, "max_tokens": 30, "return_token_ids": True}
    full = run(lambda: post(app, CHAT, body)).json()["choices"][0]
    partial = gen_text(0, keep)
    resumed = {
        "messages": [*MESSAGES, {"role": "assistant", "content": partial}],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_tokens": 30 - keep,
        "return_token_ids": True,
    }
    rest = run(lambda: post(app, CHAT, resumed)).json()
    assert partial + rest["choices"][0]["message"]["content"] == full["message"]["content"]
    assert full["token_ids"][:keep] + rest["choices"][0]["token_ids"] == full["token_ids"]
    assert rest["choices"][0]["finish_reason"] == full["finish_reason"] == "stop"
    assert rest["prompt_token_ids"][-keep:] == gen_ids(0, keep)  # the open final message ends the prompt


def test_token_id_prompts_are_accepted_as_a_list_or_a_batch_of_one():
    _, app, _ = make()
    ids = tokens.tokenize("some words here") + [tokens.generated_token_id(3)]  # tok3 alone is no answer
    plain = run(lambda: post(app, COMPLETIONS, {"prompt": ids, "max_tokens": 2})).json()
    batch = run(lambda: post(app, COMPLETIONS, {"prompt": [ids], "max_tokens": 2})).json()
    resumed = run(lambda: post(app, COMPLETIONS, {"prompt": [5, *gen_ids(0, 3)], "max_tokens": 2})).json()
    assert plain["choices"][0]["text"] == batch["choices"][0]["text"] == "tok0 tok1"
    assert plain["usage"]["prompt_tokens"] == batch["usage"]["prompt_tokens"] == 4
    assert resumed["choices"][0]["text"] == " tok3 tok4"


@pytest.mark.parametrize(
    "prompt, needle",
    [
        ([], "The decoder prompt cannot be empty"),
        ([[]], "The decoder prompt cannot be empty"),
        ([1, -1], "Token id -1 is out of vocabulary"),
        ([1, tokens.VOCAB_SIZE_TOKENS], f"Token id {tokens.VOCAB_SIZE_TOKENS} is out of vocabulary"),
        ([1, 2.5], "token ids must be integers"),
        ([True, 2], "token ids must be integers"),
        ([[1, 2], [3]], "one prompt per request"),
        ([1, "a"], "one prompt per request"),
        ([1] * 4096, "maximum context length"),
    ],
)
def test_bad_token_id_prompts_are_openai_shaped_400s(prompt, needle):
    engine, app, _ = make()
    r = run(lambda: post(app, COMPLETIONS, {"prompt": prompt, "max_tokens": 1}))
    assert r.status_code == 400
    err = r.json()["error"]
    assert needle in err["message"]
    assert (err["type"], err["code"]) == ("BadRequestError", 400)
    assert err["param"] == ("max_tokens" if needle == "maximum context length" else "prompt")
    assert engine.stats()["by_status"] == {"400": 1} and engine.stats()["in_flight"] == 0


@pytest.mark.parametrize("extra", [{}, {"add_generation_prompt": True}])
def test_continue_final_message_with_a_generation_prompt_is_a_400(extra):
    _, app, _ = make()
    body = {"messages": [*MESSAGES, {"role": "assistant", "content": "tok0"}], "continue_final_message": True, **extra}
    r = run(lambda: post(app, CHAT, body))
    assert r.status_code == 400
    assert (
        r.json()["error"]["message"] == "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
    )


def test_an_aborted_stream_ends_with_a_chunk_without_tokens():
    engine, app, _ = make(token_delay_ms=10)

    async def go():
        call = AsgiCall(
            app,
            COMPLETIONS,
            {
                "prompt": "x",
                "max_tokens": 500,
                "ignore_eos": True,
                "stream": True,
                "return_token_ids": True,
                "stream_options": {"include_usage": True},
            },
        )
        first = [await call.next() for _ in range(3)]  # headers, tok0, tok1
        assert engine.abort_all("shutdown") == 1
        return sse_events(body_text(first + await call.rest()))

    events = run(go)
    chunks = token_chunks(events)
    assert chunks[-1] == ("", [], "abort")
    streamed = [t for _, ids, _ in chunks for t in ids]
    assert len(streamed) >= 2 and streamed == gen_ids(0, len(streamed))
    assert events[-2]["usage"]["completion_tokens"] == len(streamed)


def test_crash_at_start_while_the_file_exists(tmp_path, monkeypatch):
    """--crash-at-start-if-exists: exit code 1 before serving while the file is there (a crash loop);
    once it is gone the engine starts (serve() is replaced here: we only check it is reached)."""
    from agent.sim import cli, server

    flag = tmp_path / "crash"
    flag.write_text("")
    served: list[int] = []

    async def fake_serve(engine: SimEngine, options: Any) -> int:
        served.append(options.port)
        return 0

    monkeypatch.setattr(server, "serve", fake_serve)
    argv = ["--port", "8123", "--crash-at-start-if-exists", str(flag)]
    assert cli.main(argv) == 1 and served == []
    flag.unlink()
    assert cli.main(argv) == 0 and served == [8123]
