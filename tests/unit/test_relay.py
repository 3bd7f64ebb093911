"""The resuming relay's pure modules: SSE framing, the request, the transcript, membership.

Event bytes are those vLLM 0.32 writes (model_dump_json(exclude_unset=True), compact JSON), with
and without `return_token_ids`; the `*_PLAIN` events are what a client that did not ask for token
IDs gets from vLLM directly, so "forwarded byte-identically" is checked against them.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from agent.gateway.relay import sse
from agent.gateway.relay.handler import INSTANCE_HEADER, unanswered
from agent.gateway.relay.membership import Attempt, Member, Membership
from agent.gateway.relay.request import parse
from agent.gateway.relay.transcript import INSTANCES_FIELD, Signal, Transcript, error_event

# --- vLLM's events ------------------------------------------------------------------------------

_CHAT_HEAD = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":5,"model":"m","choices":'

# /v1/chat/completions with return_token_ids: role chunk (+ prompt ids), two tokens, the finish chunk (EOS)
CHAT_IDS = [
    _CHAT_HEAD + b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
    b'"prompt_token_ids":[1,2,3],"prompt_text":null}',
    _CHAT_HEAD + b'[{"index":0,"delta":{"content":" tok1"},"logprobs":null,"finish_reason":null,"token_ids":[11]}]}',
    _CHAT_HEAD + b'[{"index":0,"delta":{"content":" tok2"},"logprobs":null,"finish_reason":null,"token_ids":[12]}]}',
    _CHAT_HEAD + b'[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop","stop_reason":null,'
    b'"token_ids":[2]}]}',
]
# the same stream as vLLM writes it without return_token_ids
CHAT_PLAIN = [
    _CHAT_HEAD + b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
    b'"prompt_token_ids":null,"prompt_text":null}',
    _CHAT_HEAD + b'[{"index":0,"delta":{"content":" tok1"},"logprobs":null,"finish_reason":null,"token_ids":null}]}',
    _CHAT_HEAD + b'[{"index":0,"delta":{"content":" tok2"},"logprobs":null,"finish_reason":null,"token_ids":null}]}',
    _CHAT_HEAD + b'[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop","stop_reason":null,'
    b'"token_ids":null}]}',
]
CHAT_USAGE = _CHAT_HEAD + b'[],"usage":{"prompt_tokens":3,"total_tokens":6,"completion_tokens":3}}'
CHAT_ABORT = _CHAT_HEAD + (
    b'[{"index":0,"delta":{"content":" tok2"},"logprobs":null,"finish_reason":"abort",'
    b'"stop_reason":null,"token_ids":[12]}]}'
)
CHAT_ABORT_EMPTY = _CHAT_HEAD + (
    b'[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"abort","stop_reason":null}]}'
)

_CMPL_HEAD = b'data: {"id":"cmpl-1","object":"text_completion","created":5,"model":"m","choices":'

# /v1/completions with return_token_ids: prompt ids inside the first chunk's choice
CMPL_IDS = [
    _CMPL_HEAD + b'[{"index":0,"text":" a","logprobs":null,"finish_reason":null,"stop_reason":null,'
    b'"prompt_token_ids":[1,2],"token_ids":[20]}]}',
    _CMPL_HEAD + b'[{"index":0,"text":" b","logprobs":null,"finish_reason":null,"stop_reason":null,'
    b'"prompt_token_ids":null,"token_ids":[21]}]}',
    _CMPL_HEAD + b'[{"index":0,"text":"","logprobs":null,"finish_reason":"length","stop_reason":null,'
    b'"prompt_token_ids":null,"token_ids":[22]}]}',
]
CMPL_PLAIN = [
    _CMPL_HEAD + b'[{"index":0,"text":" a","logprobs":null,"finish_reason":null,"stop_reason":null,'
    b'"prompt_token_ids":null,"token_ids":null}]}',
    _CMPL_HEAD + b'[{"index":0,"text":" b","logprobs":null,"finish_reason":null,"stop_reason":null,'
    b'"prompt_token_ids":null,"token_ids":null}]}',
    _CMPL_HEAD + b'[{"index":0,"text":"","logprobs":null,"finish_reason":"length","stop_reason":null,'
    b'"prompt_token_ids":null,"token_ids":null}]}',
]
CMPL_USAGE = _CMPL_HEAD + b'[],"usage":{"prompt_tokens":2,"total_tokens":5,"completion_tokens":3}}'

# vLLM's mid-stream error event (json.dumps of ErrorResponse.model_dump(): default separators)
ERROR_EVENT = (
    b'data: {"error": {"message": "Internal server error", "type": "InternalServerError", "param": null, "code": 500}}'
)


def continuation_chunk(
    text: str, ids: list[int], finish: str | None = None, prompt: list[int] | None = None, stop_reason=None
) -> bytes:
    """A chunk of the relay's /v1/completions continuation, as vLLM writes it (its own id/created)."""
    choice = {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": finish,
        "stop_reason": stop_reason,
        "prompt_token_ids": prompt,
        "token_ids": ids,
    }
    obj = {"id": "cmpl-other", "object": "text_completion", "created": 99, "model": "m", "choices": [choice]}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode()


CONT_USAGE = (
    b'data: {"id":"cmpl-other","object":"text_completion","created":99,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":4,"total_tokens":6,"completion_tokens":2}}'
)


def chat_req(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    req = parse("chat", json.dumps(body).encode())
    assert req is not None
    return req


def cmpl_req(**kw):
    body = {"model": "m", "prompt": "hello", **kw}
    req = parse("completion", json.dumps(body).encode())
    assert req is not None
    return req


def payload(ev: bytes) -> dict:
    assert ev.startswith(b"data: ")
    return json.loads(ev[len(b"data: ") :])


def with_instances(ev: bytes, instances: list[str]) -> bytes:
    assert ev.endswith(b"}")
    return ev[:-1] + b',"ernie_instances":' + json.dumps(instances, separators=(",", ":")).encode() + b"}"


# ================================================================================================
# sse
# ================================================================================================


def _stream(events: list[bytes]) -> bytes:
    return b"".join(sse.event(ev[len(b"data: ") :]) for ev in events) + b"data: [DONE]\n\n"


def test_event_builds_a_data_line_with_its_terminator():
    assert sse.event(b'{"a":1}') == b'data: {"a":1}\n\n'


def test_splitter_whole_stream_gives_each_event():
    s = sse.EventSplitter()
    assert s.feed(_stream(CHAT_IDS)) == [*CHAT_IDS, b"data: [DONE]"]
    assert s.pending == b""


def test_splitter_one_byte_at_a_time_gives_the_same_events():
    raw = _stream(CHAT_IDS + CMPL_IDS)
    s = sse.EventSplitter()
    got = []
    for i in range(len(raw)):
        got.extend(s.feed(raw[i : i + 1]))
    assert got == [*CHAT_IDS, *CMPL_IDS, b"data: [DONE]"]
    assert s.pending == b""


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 64, 199, 1000])
def test_splitter_any_chunking_gives_the_same_events(cut):
    raw = _stream(CHAT_IDS)
    s = sse.EventSplitter()
    got = []
    for i in range(0, len(raw), cut):
        got.extend(s.feed(raw[i : i + cut]))
    assert got == [*CHAT_IDS, b"data: [DONE]"]


def test_splitter_boundary_inside_the_terminator_and_pending_of_a_cut_event():
    s = sse.EventSplitter()
    assert s.feed(b"data: {}\n") == []
    assert s.pending == b"data: {}\n"
    assert s.feed(b'\ndata: {"x"') == [b"data: {}"]
    assert s.pending == b'data: {"x"'  # what a stream broken here leaves behind
    assert s.feed(b"") == []


def test_take_token_ids_chat_first_chunk_takes_prompt_ids_only():
    stripped, ids = sse.take_token_ids(CHAT_IDS[0])
    assert stripped == CHAT_PLAIN[0]
    assert ids.prompt == b"1,2,3" and ids.generated is None


@pytest.mark.parametrize("i", [1, 2, 3])
def test_take_token_ids_chat_token_chunks_take_generated_ids_only(i):
    stripped, ids = sse.take_token_ids(CHAT_IDS[i])
    assert stripped == CHAT_PLAIN[i]
    assert ids.prompt is None
    assert ids.generated == [b"11", b"12", b"2"][i - 1]


def test_take_token_ids_completion_chunks_carry_both_in_the_choice():
    stripped, ids = sse.take_token_ids(CMPL_IDS[0])
    assert stripped == CMPL_PLAIN[0]
    assert (ids.prompt, ids.generated) == (b"1,2", b"20")
    stripped, ids = sse.take_token_ids(CMPL_IDS[1])
    assert stripped == CMPL_PLAIN[1]
    assert (ids.prompt, ids.generated) == (None, b"21")  # "prompt_token_ids":null stays null


def test_take_token_ids_does_not_confuse_one_key_for_the_other():
    only_prompt = b'data: {"prompt_token_ids":[4,5],"token_ids":null}'
    stripped, ids = sse.take_token_ids(only_prompt)
    assert (ids.prompt, ids.generated) == (b"4,5", None)
    assert stripped == b'data: {"prompt_token_ids":null,"token_ids":null}'
    only_gen = b'data: {"prompt_token_ids":null,"token_ids":[6]}'
    stripped, ids = sse.take_token_ids(only_gen)
    assert (ids.prompt, ids.generated) == (None, b"6")
    assert stripped == b'data: {"prompt_token_ids":null,"token_ids":null}'
    # key order does not matter either
    _, ids = sse.take_token_ids(b'data: {"token_ids":[9],"prompt_token_ids":[7,8]}')
    assert (ids.prompt, ids.generated) == (b"7,8", b"9")


def test_take_token_ids_leaves_text_that_looks_like_a_token_field():
    content = 'say "token_ids":[5] and "finish_reason":"stop"'
    obj = {
        "id": "chatcmpl-1",
        "choices": [
            {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None, "token_ids": [7]}
        ],
    }
    ev = b"data: " + json.dumps(obj, separators=(",", ":")).encode()
    stripped, ids = sse.take_token_ids(ev)
    assert ids.generated == b"7" and ids.prompt is None
    assert payload(stripped)["choices"][0]["delta"]["content"] == content
    assert payload(stripped)["choices"][0]["token_ids"] is None
    assert sse.finish_reason(ev) is None


def test_take_token_ids_empty_list_and_no_fields():
    stripped, ids = sse.take_token_ids(b'data: {"token_ids":[]}')
    assert stripped == b'data: {"token_ids":null}' and ids.generated == b""
    assert sse.take_token_ids(CHAT_PLAIN[1]) == (CHAT_PLAIN[1], sse.TokenFields(None, None))


def test_peek_token_ids_reads_without_changing():
    ids = sse.peek_token_ids(CMPL_IDS[0])
    assert (ids.prompt, ids.generated) == (b"1,2", b"20")


def test_finish_reason():
    assert [sse.finish_reason(ev) for ev in CHAT_IDS] == [None, None, None, "stop"]
    assert sse.finish_reason(CMPL_IDS[2]) == "length"
    assert sse.finish_reason(CHAT_ABORT) == "abort"
    assert sse.finish_reason(b'data: {"choices":[{"finish_reason":"tool_calls"}]}') == "tool_calls"
    assert sse.finish_reason(b"data: [DONE]") is None


def test_is_done_is_error_is_usage_only():
    assert sse.is_done(b"data: [DONE]") and sse.is_done(b"data: [DONE]\n")
    assert not any(sse.is_done(ev) for ev in CHAT_IDS)
    assert sse.is_error(ERROR_EVENT)
    assert sse.is_error(error_event("x"))  # the relay's own error event is recognised too
    assert not any(sse.is_error(ev) for ev in [*CHAT_IDS, *CMPL_IDS, CHAT_USAGE])
    assert sse.is_usage_only(CHAT_USAGE) and sse.is_usage_only(CMPL_USAGE)
    assert not any(sse.is_usage_only(ev) for ev in [*CHAT_IDS, *CMPL_IDS])


@pytest.mark.parametrize("raw,ids", [(None, []), (b"", []), (b"7", [7]), (b"1,22,333", [1, 22, 333])])
def test_count_ids_and_parse_ids(raw, ids):
    assert sse.parse_ids(raw) == ids
    assert sse.count_ids(raw) == len(ids)


# ================================================================================================
# request
# ================================================================================================


@pytest.mark.parametrize(
    "kw,why",
    [
        ({"n": 2}, "n > 1"),
        ({"best_of": 2}, "n > 1"),
        ({"use_beam_search": True}, "beam search"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool calls"),
        ({"tool_choice": "auto"}, "tool calls"),
        ({"response_format": {"type": "json_object"}}, "response_format (guided decoding)"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
            "response_format (guided decoding)",
        ),
        ({"guided_json": {"type": "object"}}, "guided decoding"),
        ({"guided_regex": "a+"}, "guided decoding"),
        ({"guided_choice": ["a", "b"]}, "guided decoding"),
        ({"guided_grammar": "root ::= x"}, "guided decoding"),
        ({"structured_outputs": {"regex": "a+"}}, "guided decoding"),
        ({"presence_penalty": 0.5}, "presence penalty"),
        ({"frequency_penalty": 0.1}, "frequency penalty"),
        ({"stop": ["\n"]}, "stop strings"),
        ({"stop": "END"}, "stop strings"),
        ({"echo": True}, "echo"),
    ],
)
def test_chat_features_that_prevent_an_exact_continuation(kw, why):
    req = chat_req(stream=True, **kw)
    assert not req.resumable and req.why_not == why


@pytest.mark.parametrize(
    "kw,why",
    [
        ({"n": 3}, "n > 1"),
        ({"logprobs": 0}, "logprobs"),
        ({"logprobs": 5}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"prompt": ["a", "b"]}, "a batch of prompts"),
        ({"prompt": [[1, 2], [3]]}, "a batch of prompts"),
        ({"response_format": {"type": "json_object"}}, "response_format (guided decoding)"),
        ({"guided_json": {}}, "guided decoding"),
        ({"presence_penalty": 1.0}, "presence penalty"),
        ({"frequency_penalty": -0.5}, "frequency penalty"),
        ({"stop": ["."]}, "stop strings"),
        ({"prompt_logprobs": 0}, "prompt_logprobs"),
    ],
)
def test_completion_features_that_prevent_an_exact_continuation(kw, why):
    req = cmpl_req(**kw)
    assert not req.resumable and req.why_not == why


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"stream": True, "max_tokens": 100, "temperature": 0.7, "top_p": 0.9, "seed": 1},
        {"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "stop": [], "logprobs": False},
        {"response_format": {"type": "text"}, "tool_choice": "none", "repetition_penalty": 1.1},
        {"stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True},
    ],
)
def test_plain_chat_requests_are_resumable(kw):
    req = chat_req(**kw)
    assert req.resumable and req.why_not == ""


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"prompt": [1, 2, 3], "max_tokens": 8, "stream": True},
        {"temperature": 0, "top_k": 5, "min_tokens": 2, "stop_token_ids": [7], "logprobs": None, "stop": None},
    ],
)
def test_plain_completion_requests_are_resumable(kw):
    req = cmpl_req(**kw)
    assert req.resumable and req.why_not == ""


def test_parse_rejects_what_is_not_a_json_object():
    assert parse("chat", b"not json") is None
    assert parse("chat", b"[1,2]") is None
    assert parse("completion", b"\xff\xfe") is None


def test_parse_does_not_fail_on_a_malformed_field():
    # the engine says what is wrong with it (400); the relay must not fail first
    for rf in ("json", ["json_object"]):
        req = parse("chat", json.dumps({"model": "m", "messages": [], "response_format": rf}).encode())
        assert req is not None and not req.resumable


def test_parse_reads_stream_usage_token_ids_and_limits():
    req = chat_req(
        stream=True, stream_options={"include_usage": True}, return_token_ids=True, max_tokens=50, min_tokens=3
    )
    assert (req.kind, req.stream, req.include_usage, req.client_wants_token_ids) == ("chat", True, True, True)
    assert (req.max_tokens, req.min_tokens, req.model) == (50, 3, "m")
    assert chat_req(max_tokens=50, max_completion_tokens=20).max_tokens == 20  # as vLLM: the newer name wins
    assert chat_req().max_tokens is None
    assert cmpl_req().max_tokens == 16  # vLLM's completion default
    assert cmpl_req(max_tokens=None).max_tokens is None
    assert not cmpl_req().stream and not cmpl_req().include_usage


def test_chat_max_completion_tokens_null_falls_back_to_max_tokens():
    # vLLM: max_completion_tokens if it is not None, else max_tokens
    assert chat_req(max_completion_tokens=None, max_tokens=50).max_tokens == 50


def test_unusual_max_tokens_makes_a_request_not_resumable():
    for v in ("10", 1.5, True):
        req = chat_req(max_tokens=v)
        assert not req.resumable and req.why_not == "unusual max_tokens"


def test_upstream_body_forces_a_stream_with_token_ids():
    req = chat_req(temperature=0.5)  # a non-streaming client
    body = json.loads(req.upstream_body())
    assert body["stream"] is True and body["return_token_ids"] is True
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["temperature"] == 0.5
    assert req.body.get("stream") is None  # the client's request itself is untouched


def test_upstream_body_of_a_non_streaming_client_drops_stream_options():
    req = cmpl_req(stream=False, stream_options={"include_usage": True})
    body = json.loads(req.upstream_body())
    assert body["stream"] is True and "stream_options" not in body


def test_upstream_body_of_a_streaming_client_keeps_its_stream_options():
    req = chat_req(stream=True, stream_options={"include_usage": True})
    body = json.loads(req.upstream_body())
    assert body["stream_options"] == {"include_usage": True} and body["return_token_ids"] is True


def test_upstream_body_leaves_a_non_resumable_request_as_it_was():
    for req in (chat_req(n=2, stream=False), chat_req(logprobs=True, stream=True), cmpl_req(echo=True)):
        assert not req.resumable
        assert json.loads(req.upstream_body()) == req.body


def test_continuation_prompt_is_prompt_ids_then_generated_ids():
    body = json.loads(chat_req(stream=True).continuation_body([1, 2, 3], [11, 12]))
    assert body["prompt"] == [1, 2, 3, 11, 12]
    assert body["model"] == "m" and body["stream"] is True and body["return_token_ids"] is True
    assert "messages" not in body


def test_continuation_reduces_max_tokens_by_what_was_generated():
    assert json.loads(chat_req(max_tokens=10).continuation_body([1], [5, 6, 7]))["max_tokens"] == 7
    assert json.loads(chat_req(max_completion_tokens=10).continuation_body([1], [5, 6]))["max_tokens"] == 8
    assert "max_completion_tokens" not in json.loads(chat_req(max_completion_tokens=10).continuation_body([1], [5]))
    assert json.loads(cmpl_req().continuation_body([1], [5, 6, 7, 8]))["max_tokens"] == 12  # 16 - 4
    # no limit: up to the context, not the completion default of 16
    body = json.loads(chat_req().continuation_body([1], [5]))
    assert "max_tokens" in body and body["max_tokens"] is None


def test_continuation_reduces_min_tokens():
    assert json.loads(chat_req(min_tokens=5).continuation_body([1], [5, 6]))["min_tokens"] == 3
    assert json.loads(chat_req(min_tokens=2).continuation_body([1], [5, 6, 7]))["min_tokens"] == 0
    assert "min_tokens" not in json.loads(chat_req().continuation_body([1], [5]))


def test_continuation_carries_sampling_params():
    params = {
        "temperature": 0.3,
        "top_p": 0.8,
        "top_k": 20,
        "min_p": 0.05,
        "seed": 42,
        "repetition_penalty": 1.2,
        "stop_token_ids": [9],
        "ignore_eos": True,
        "skip_special_tokens": False,
        "logit_bias": {"5": -100},
        "user": "u",
    }
    body = json.loads(chat_req(stream=True, **params).continuation_body([1], [2]))
    assert {k: body[k] for k in params} == params
    # what the continuation must not take from the client's request
    for k in ("messages", "stream_options", "n", "echo"):
        assert k not in body


def test_continuation_does_not_truncate_its_prompt_again():
    # prompt_token_ids are the prompt after truncation; truncating prompt + generated again would drop
    # the start of the context the generation continues from
    body = json.loads(cmpl_req(truncate_prompt_tokens=3).continuation_body([1, 2, 3], [4, 5]))
    assert body["prompt"] == [1, 2, 3, 4, 5]
    assert body.get("truncate_prompt_tokens") in (None, -1)


def test_continuation_asks_for_usage_only_for_a_streaming_client_that_asked():
    opts = {"include_usage": True}
    assert json.loads(chat_req(stream=True, stream_options=opts).continuation_body([1], [2]))["stream_options"] == opts
    assert "stream_options" not in json.loads(chat_req(stream=True).continuation_body([1], [2]))
    assert "stream_options" not in json.loads(chat_req(stream=False, stream_options=opts).continuation_body([1], [2]))


# ================================================================================================
# transcript
# ================================================================================================


def run_native(t: Transcript, events: list[bytes]) -> list[tuple[bytes | None, str]]:
    return [t.native(ev) for ev in events]


def test_native_stream_is_forwarded_with_ids_nulled_byte_identical():
    t = Transcript(chat_req(stream=True))
    t.served_by("e1")
    out = run_native(t, CHAT_IDS)
    assert out[:3] == [(CHAT_PLAIN[0], Signal.NONE), (CHAT_PLAIN[1], Signal.NONE), (CHAT_PLAIN[2], Signal.NONE)]
    assert out[3] == (with_instances(CHAT_PLAIN[3], ["e1"]), Signal.FINISH)
    assert (t.id, t.created, t.model) == ("chatcmpl-1", 5, "m")
    assert t.started and t.prompt_ids() == [1, 2, 3]
    assert t.generated_ids() == [11, 12, 2] and t.finish_reason == "stop"
    assert t.native(b"data: [DONE]") == (None, Signal.DONE)


def test_native_completion_stream_is_forwarded_with_ids_nulled():
    t = Transcript(cmpl_req(stream=True))
    t.served_by("e1")
    out = run_native(t, CMPL_IDS)
    assert [p for p, _ in out] == [CMPL_PLAIN[0], CMPL_PLAIN[1], with_instances(CMPL_PLAIN[2], ["e1"])]
    assert [s for _, s in out] == [Signal.NONE, Signal.NONE, Signal.FINISH]
    assert t.prompt_ids() == [1, 2] and t.generated_ids() == [20, 21, 22] and t.finish_reason == "length"


def test_native_stream_keeps_ids_the_client_asked_for():
    t = Transcript(chat_req(stream=True, return_token_ids=True))
    t.served_by("e1")
    out = run_native(t, CHAT_IDS)
    assert [p for p, _ in out] == [*CHAT_IDS[:3], with_instances(CHAT_IDS[3], ["e1"])]
    assert t.prompt_ids() == [1, 2, 3] and t.generated_ids() == [11, 12, 2]


def test_finish_chunk_names_every_instance_that_served():
    t = Transcript(chat_req(stream=True))
    t.served_by("e1")
    t.served_by("e1")  # the same instance again is not named twice in a row
    t.served_by("e2")
    ev, sig = t.native(CHAT_IDS[3])
    assert sig == Signal.FINISH and payload(ev)[INSTANCES_FIELD] == ["e1", "e2"]


def test_native_error_event_is_a_signal_not_forwarded():
    t = Transcript(chat_req(stream=True))
    t.native(CHAT_IDS[0])
    assert t.native(ERROR_EVENT) == (None, Signal.ERROR)


def test_abort_is_not_forwarded_as_a_finish_and_its_tokens_are_kept():
    t = Transcript(chat_req(stream=True))
    t.served_by("e1")
    run_native(t, CHAT_IDS[:2])
    ev, sig = t.native(CHAT_ABORT)
    assert sig == Signal.ABORT
    choice = payload(ev)["choices"][0]
    assert choice["finish_reason"] is None and choice["delta"] == {"content": " tok2"}
    assert choice["token_ids"] is None and INSTANCES_FIELD not in payload(ev)
    assert t.generated_ids() == [11, 12] and t.finish_reason is None


def test_abort_without_tokens_is_dropped():
    t = Transcript(chat_req(stream=True))
    run_native(t, CHAT_IDS[:2])
    assert t.native(CHAT_ABORT_EMPTY) == (None, Signal.ABORT)
    assert t.generated_ids() == [11] and t.finish_reason is None


def resumed_chat(**kw) -> tuple[Transcript, list[tuple[bytes | None, str]]]:
    """A chat stream cut after ' tok1' on e1 and continued on e2 (tokens 12, then EOS 2)."""
    t = Transcript(chat_req(**kw))
    t.served_by("e1")
    run_native(t, CHAT_IDS[:2])
    t.resumes += 1
    t.served_by("e2")
    out = [
        t.continued(ev)
        for ev in (
            continuation_chunk(" tok2", [12], prompt=[1, 2, 3, 11]),
            continuation_chunk("", [2], finish="stop"),
            CONT_USAGE,
            b"data: [DONE]",
        )
    ]
    return t, out


def test_continuation_request_starts_from_every_relayed_token():
    t = Transcript(chat_req(stream=True, max_tokens=10))
    run_native(t, CHAT_IDS[:3])
    body = json.loads(t.continuation())
    assert body["prompt"] == [1, 2, 3, 11, 12] and body["max_tokens"] == 8


def test_continuation_chunks_come_out_in_the_clients_chat_shape():
    t, out = resumed_chat(stream=True)
    # a token chunk: exactly what vLLM would have written for the first attempt
    assert out[0] == (CHAT_PLAIN[2], Signal.NONE)
    ev, sig = out[1]
    assert sig == Signal.FINISH
    obj = payload(ev)
    assert (obj["id"], obj["object"], obj["created"], obj["model"]) == ("chatcmpl-1", "chat.completion.chunk", 5, "m")
    assert obj["choices"] == [
        {
            "index": 0,
            "delta": {"content": ""},
            "logprobs": None,
            "finish_reason": "stop",
            "token_ids": None,
            "stop_reason": None,
        }
    ]
    assert obj[INSTANCES_FIELD] == ["e1", "e2"]
    assert out[2] == (None, Signal.NONE)  # the continuation's own usage chunk is not forwarded
    assert out[3] == (None, Signal.DONE)
    assert t.generated_ids() == [11, 12, 2] and t.finish_reason == "stop"


def test_continuation_chunks_carry_ids_when_the_client_asked():
    t, out = resumed_chat(stream=True, return_token_ids=True)
    assert payload(out[0][0])["choices"][0]["token_ids"] == [12]


def test_continuation_chunks_in_completion_shape():
    t = Transcript(cmpl_req(stream=True, max_tokens=3))
    t.served_by("e1")
    run_native(t, CMPL_IDS[:1])
    t.resumes += 1
    t.served_by("e2")
    assert json.loads(t.continuation())["prompt"] == [1, 2, 20]
    ev, sig = t.continued(continuation_chunk(" b", [21], prompt=[1, 2, 20]))
    assert sig == Signal.NONE
    assert payload(ev) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 5,
        "model": "m",
        "choices": [{"index": 0, "text": " b", "logprobs": None, "finish_reason": None, "token_ids": None}],
    }
    ev, sig = t.continued(continuation_chunk("", [22], finish="length"))
    assert sig == Signal.FINISH
    obj = payload(ev)
    assert obj["id"] == "cmpl-1" and obj["choices"][0]["finish_reason"] == "length"
    assert obj[INSTANCES_FIELD] == ["e1", "e2"]
    assert t.generated_ids() == [20, 21, 22]


def test_continuation_abort_keeps_tokens_without_a_finish():
    t = Transcript(chat_req(stream=True))
    run_native(t, CHAT_IDS[:2])
    ev, sig = t.continued(continuation_chunk(" tok2", [12], finish="abort"))
    assert sig == Signal.ABORT
    assert payload(ev)["choices"][0]["finish_reason"] is None
    assert t.generated_ids() == [11, 12] and t.finish_reason is None


def test_continuation_error_and_empty_chunks():
    t = Transcript(chat_req(stream=True))
    run_native(t, CHAT_IDS[:2])
    assert t.continued(ERROR_EVENT) == (None, Signal.ERROR)
    assert t.continued(continuation_chunk("", [])) == (None, Signal.NONE)


def test_usage_after_a_resume_counts_the_prompt_once_and_every_completion_token():
    t, _ = resumed_chat(stream=True, stream_options={"include_usage": True})
    assert t.usage() == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}
    closing = t.closing_events()
    # the relay's usage chunk is what vLLM writes for an uninterrupted stream with the same counts
    assert closing == [CHAT_USAGE, b"data: [DONE]"]


def test_closing_events_without_a_resume_pass_the_engines_usage_chunk():
    t = Transcript(cmpl_req(stream=True, stream_options={"include_usage": True}))
    t.served_by("e1")
    out = run_native(t, [*CMPL_IDS, CMPL_USAGE])
    assert out[-1] == (None, Signal.NONE)  # held back until the end
    assert t.closing_events() == [CMPL_USAGE, b"data: [DONE]"]


def test_closing_events_without_include_usage_is_only_done():
    t = Transcript(chat_req(stream=True))
    run_native(t, CHAT_IDS)
    assert t.closing_events() == [b"data: [DONE]"]
    t, _ = resumed_chat(stream=True)
    assert t.closing_events() == [b"data: [DONE]"]


def test_closing_usage_is_counted_when_the_engine_sent_none():
    t = Transcript(cmpl_req(stream=True, stream_options={"include_usage": True}))
    run_native(t, CMPL_IDS)  # the stream ended before vLLM's usage chunk
    assert t.closing_events() == [CMPL_USAGE, b"data: [DONE]"]


def test_non_streaming_chat_response_without_a_resume():
    t = Transcript(chat_req())
    t.served_by("e1")
    run_native(t, CHAT_IDS)
    obj = json.loads(t.response())
    assert (obj["id"], obj["object"], obj["created"], obj["model"]) == ("chatcmpl-1", "chat.completion", 5, "m")
    choice = obj["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == " tok1 tok2"
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    assert "token_ids" not in choice and "prompt_token_ids" not in obj
    assert obj["usage"] == {
        "prompt_tokens": 3,
        "total_tokens": 6,
        "completion_tokens": 3,
        "prompt_tokens_details": None,
    }
    assert obj[INSTANCES_FIELD] == ["e1"]


def test_non_streaming_chat_response_after_a_resume_has_the_full_text():
    t, out = resumed_chat()
    assert all(p is None for p, _ in out)  # nothing is streamed to a non-streaming client
    obj = json.loads(t.response())
    assert obj["id"] == "chatcmpl-1" and obj["object"] == "chat.completion"
    assert obj["choices"][0]["message"]["content"] == " tok1 tok2"
    assert obj["choices"][0]["finish_reason"] == "stop"
    assert obj["usage"]["prompt_tokens"] == 3 and obj["usage"]["completion_tokens"] == 3
    assert obj[INSTANCES_FIELD] == ["e1", "e2"]


def test_non_streaming_chat_response_with_token_ids():
    t, _ = resumed_chat(return_token_ids=True)
    obj = json.loads(t.response())
    assert obj["prompt_token_ids"] == [1, 2, 3] and obj["choices"][0]["token_ids"] == [11, 12, 2]


def test_non_streaming_completion_response_after_a_resume():
    t = Transcript(cmpl_req(return_token_ids=True))
    t.served_by("e1")
    run_native(t, CMPL_IDS[:1])
    t.resumes += 1
    t.served_by("e2")
    t.continued(continuation_chunk(" b", [21], prompt=[1, 2, 20]))
    t.continued(continuation_chunk("", [22], finish="length"))
    obj = json.loads(t.response())
    assert (obj["id"], obj["object"], obj["created"]) == ("cmpl-1", "text_completion", 5)
    choice = obj["choices"][0]
    assert choice["text"] == " a b" and choice["finish_reason"] == "length"
    assert choice["token_ids"] == [20, 21, 22] and choice["prompt_token_ids"] == [1, 2]
    assert obj["usage"]["prompt_tokens"] == 2 and obj["usage"]["completion_tokens"] == 3
    assert obj["usage"]["total_tokens"] == 5 and obj[INSTANCES_FIELD] == ["e1", "e2"]


def test_non_streaming_response_keeps_an_aborted_chunks_text():
    t = Transcript(chat_req())
    run_native(t, CHAT_IDS[:2])
    t.native(CHAT_ABORT)
    t.resumes += 1
    t.continued(continuation_chunk("", [2], finish="stop"))
    obj = json.loads(t.response())
    assert obj["choices"][0]["message"]["content"] == " tok1 tok2"
    assert obj["usage"]["completion_tokens"] == 3


def test_generated_count_equals_the_number_of_ids():
    t = Transcript(chat_req(stream=True))
    assert t.generated_count() == 0 and not t.started
    run_native(t, CHAT_IDS[:3])
    t.continued(continuation_chunk(" x y z", [30, 31, 32]))
    t.continued(continuation_chunk("", []))
    assert t.generated_ids() == [11, 12, 30, 31, 32]
    assert t.generated_count() == len(t.generated_ids()) == 5


# ================================================================================================
# membership
# ================================================================================================


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def member(iid: str, healthy: bool = True) -> Member:
    return Member(iid, f"10.0.0.{ord(iid[-1]) % 250}:8000", healthy)


def tracked(m: Membership, clock: FakeClock, instance: str) -> tuple[Attempt, list[int]]:
    a = Attempt(clock)
    closed: list[int] = []
    a.close = lambda: closed.append(1)
    m.track(a, instance)
    return a, closed


def test_host_override_is_the_base64_address():
    assert Member("a", "10.0.0.1:8000", True).host_override == "MTAuMC4wLjE6ODAwMA=="


def test_update_rescues_only_stalled_attempts_on_instances_that_left():
    clock = FakeClock(0.0)
    m = Membership(stall_s=1.0, clock=clock)
    assert m.update([member("a"), member("b"), member("c")], "v1") == []
    stalled, stalled_closed = tracked(m, clock, "a")
    flowing, flowing_closed = tracked(m, clock, "a")
    draining, draining_closed = tracked(m, clock, "b")
    staying, _ = tracked(m, clock, "c")
    clock.t = 5.0
    flowing.last_event_at = 4.8  # an event 0.2 s ago
    # a leaves; b is draining (still in the snapshot); c stays healthy
    rescued = m.update([member("b", healthy=False), member("c")], "v2")
    assert rescued == [stalled]
    assert stalled.rescued and stalled_closed == [1]
    assert not flowing.rescued and flowing_closed == []
    assert not draining.rescued and draining_closed == []
    assert not staying.rescued
    assert m.version == "v2"


def test_sweep_later_rescues_an_attempt_that_stalls_after_its_instance_left():
    clock = FakeClock(0.0)
    m = Membership(stall_s=1.0, clock=clock)
    m.update([member("a"), member("b")])
    a, closed = tracked(m, clock, "a")
    clock.t = 0.5
    assert m.update([member("b")]) == []  # flowing when a left
    assert m.sweep() == []
    a.last_event_at = 1.0
    clock.t = 1.9
    assert m.sweep() == []
    clock.t = 2.0
    assert m.sweep() == [a] and a.rescued and closed == [1]
    clock.t = 10.0
    assert m.sweep() == [] and closed == [1]  # rescued once


def test_sweep_before_any_snapshot_rescues_nothing():
    # the relay serves before its first snapshot arrives: no instance has left anything yet
    clock = FakeClock(0.0)
    m = Membership(stall_s=1.0, clock=clock)
    a, closed = tracked(m, clock, "a")
    clock.t = 30.0
    assert m.sweep() == [] and not a.rescued and closed == []
    # once a snapshot without it arrives, it is rescued
    assert m.update([member("b")]) == [a]


def test_untracked_attempts_are_not_rescued_and_in_flight_counts():
    clock = FakeClock(0.0)
    m = Membership(stall_s=1.0, clock=clock)
    m.update([member("a")])
    a1, _ = tracked(m, clock, "a")
    a2, _ = tracked(m, clock, "a")
    assert m.in_flight("a") == 2
    m.untrack(a1)
    assert m.in_flight("a") == 1
    m.untrack(a2)
    m.untrack(a2)  # twice is harmless
    assert m.in_flight("a") == 0
    clock.t = 10.0
    assert m.update([]) == [] and not a1.rescued and not a2.rescued


def test_rescue_without_a_connection_only_marks():
    a = Attempt(FakeClock())
    a.rescue()
    assert a.rescued


def test_pick_never_returns_an_excluded_or_draining_instance():
    m = Membership(stall_s=1.0, clock=FakeClock())
    m.update([member("a"), member("b", healthy=False), member("c")])
    for _ in range(50):
        assert m.pick({"a"}).instance_id == "c"
    assert m.pick({"a", "c"}) is None
    m.update([member("b", healthy=False)])
    assert m.pick(set()) is None


def test_pick_prefers_the_least_loaded():
    clock = FakeClock()
    m = Membership(stall_s=1.0, clock=clock)
    m.update([member("a"), member("b"), member("c")])
    tracked(m, clock, "a")
    tracked(m, clock, "a")
    tracked(m, clock, "b")
    assert {m.pick(set()).instance_id for _ in range(50)} == {"c"}
    assert {m.pick({"c"}).instance_id for _ in range(50)} == {"b"}
    tracked(m, clock, "c")
    tracked(m, clock, "c")
    assert {m.pick(set()).instance_id for _ in range(50)} == {"b"}


def test_wait_pick_returns_at_once_when_an_instance_is_there():
    async def main():
        m = Membership(stall_s=1.0, clock=FakeClock())
        m.update([member("a")])
        return await m.wait_pick(set(), 5.0)

    assert asyncio.run(main()).instance_id == "a"


def test_wait_pick_returns_when_an_instance_appears():
    async def main():
        m = Membership(stall_s=1.0, clock=FakeClock())
        m.update([member("a")])

        async def later():
            await asyncio.sleep(0.01)
            m.update([member("a"), member("b", healthy=False)])  # nothing eligible yet: keep waiting
            await asyncio.sleep(0.01)
            m.update([member("a"), member("b")])

        task = asyncio.create_task(later())
        start = time.monotonic()
        got = await m.wait_pick({"a"}, 5.0)
        await task
        return got, time.monotonic() - start

    got, took = asyncio.run(main())
    assert got.instance_id == "b" and took < 2.0


def test_wait_pick_gives_none_after_its_timeout():
    async def main():
        m = Membership(stall_s=1.0)
        m.update([member("a")])
        start = time.monotonic()
        got = await m.wait_pick({"a"}, 0.05)
        return got, time.monotonic() - start

    got, took = asyncio.run(main())
    assert got is None and 0.04 <= took < 2.0


def test_wait_pick_with_no_time_left_does_not_wait():
    async def main():
        m = Membership(stall_s=1.0, clock=FakeClock(100.0))
        start = time.monotonic()
        got = await m.wait_pick(set(), 0.0)
        return got, time.monotonic() - start

    got, took = asyncio.run(main())
    assert got is None and took < 0.5


# --- an attempt the engine hop could not deliver ---------------------------------------------


def _envoy_503(details: str) -> bytes:
    return json.dumps(
        {"error": {"message": "upstream connect error", "type": "service_unavailable", "details": details}}
    ).encode()


@pytest.mark.parametrize(
    "details",
    [
        "upstream_reset_before_response_started{remote_connection_failure,delayed_connect_error:_Connection_refused}",
        "upstream_reset_before_response_started{local_connection_failure}",
        "upstream_reset_before_response_started{connection_timeout}",
    ],
)
def test_a_connection_that_never_opened_is_not_a_crash(details):
    """A cut host or a dead port: the request never reached the engine, so it cannot be a prompt of
    death (the partition drill gave up on a healthy fleet when two such attempts counted as crashes)."""
    lost = unanswered(503, {INSTANCE_HEADER: "e1"}, _envoy_503(details))
    assert lost == ("e1", False)


@pytest.mark.parametrize(
    "details",
    [
        "upstream_reset_before_response_started{connection_termination}",
        "upstream_reset_before_response_started{remote_reset}",
    ],
)
def test_a_reset_after_the_request_reached_the_engine_is_a_crash(details):
    assert unanswered(503, {INSTANCE_HEADER: "e1"}, _envoy_503(details)) == ("e1", True)


def test_other_replies_are_not_unanswered_requests():
    assert unanswered(503, {INSTANCE_HEADER: "e1"}, _envoy_503("no_healthy_upstream")) is None
    assert unanswered(400, {}, b'{"error": {}}') is None


def test_continuations_of_one_key_spread_at_the_load_bound_instead_of_piling_on_one_instance():
    """100 streams of one system prompt (one affinity key) lose their instance at once: their
    continuations go to the key's rendezvous-first survivor only up to 1.5x the mean load."""
    clock = FakeClock()
    m = Membership(stall_s=1.0, clock=clock)
    m.update([member(i) for i in ("e2", "e3", "e4")])
    placed = []
    for _ in range(100):
        chosen = m.pick(set(), key="one-system-prompt")
        a = Attempt(clock)
        m.track(a, chosen.instance_id)
        placed.append(chosen.instance_id)
    counts = {i: placed.count(i) for i in ("e2", "e3", "e4")}
    assert max(counts.values()) <= 51, counts  # 1.5 x 33, not 100 on one
    assert m.pick(set(), key="another") is not None


def test_an_instance_that_refused_is_a_candidate_again_once_the_snapshot_changes():
    """The relay's snapshot can lag Envoy's: an instance Envoy refused (draining there already, or
    not yet back) is left out only until the next snapshot, not for the rest of the request."""
    m = Membership(stall_s=1.0, clock=FakeClock())
    m.update([member("e1"), member("e2")], version="v1")
    refused = {"e2": "v1"}
    assert m.pick({"e1"}, refused=refused) is None
    m.update([member("e1"), member("e2")], version="v2")
    assert m.pick({"e1"}, refused=refused).instance_id == "e2"
