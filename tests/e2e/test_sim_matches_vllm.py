"""The SIMULATED engine speaks real vLLM's wire format: the same JSON structure (keys, nesting, which
values are null, lists or numbers) per chunk type — first, content, final, usage — and per
non-streaming answer, for chat and completions, with `return_token_ids` on and off.

Real vLLM is one engine of the session's shared mesh (tests/e2e/conftest_up.py), asked directly on
its own port, one request at a time; the simulated engine runs in-process.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from agent.sim.app import build_app
from agent.sim.engine import EngineConfig, SimEngine
from tests.e2e.conftest_up import vllm_mesh  # noqa: F401  (shared session fixture)

pytestmark = pytest.mark.timeout(1500)  # the first user of the shared mesh pays for starting it
REQUEST_TIMEOUT_S = 300
MAX_TOKENS = 6
MESSAGES = [{"role": "user", "content": "Count from one to twenty, separated by commas."}]
PROMPT = "One, two, three,"
STOP_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys and nesting, with scalars replaced by their type names."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def keys_only(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: keys_only(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [keys_only(value[0])] if value else []
    return "*"


def sse(text: str) -> list[Any]:
    out = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def chunk_type(event: Any, index: int) -> str:
    if event == "[DONE]":
        return "done"
    if not event["choices"]:
        return "usage"
    choice = event["choices"][0]
    if "delta" in choice and "role" in choice["delta"]:
        return "first"
    if choice["finish_reason"] is not None:
        return "final"
    return "first" if index == 0 else "content"  # a completion stream's first chunk carries the prompt IDs


def shapes_by_type(events: list[Any], view=shape) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for i, e in enumerate(events):
        s = view(e)
        bucket = out.setdefault(chunk_type(e, i), [])
        if s not in bucket:
            bucket.append(s)
    return out


def token_ids_streamed(events: list[Any]) -> int:
    return sum(len(e["choices"][0].get("token_ids") or []) for e in events if e != "[DONE]" and e["choices"])


class Sim:
    def __init__(self, model: str) -> None:
        self.app = build_app(SimEngine(EngineConfig(name="sim-vs-vllm", model=model, token_delay_ms=0)))

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://sim") as c:
                return await c.post(path, json=body)

        return asyncio.run(go())


def test_simulated_engine_wire_shapes_match_real_vllm(vllm_mesh):
    model = vllm_mesh.plan.model_name
    real = httpx.Client(base_url=f"http://127.0.0.1:{vllm_mesh.plan.engine_port(0)}", timeout=REQUEST_TIMEOUT_S)
    sim = Sim(model)
    mismatches: list[str] = []
    seen: dict[str, Any] = {}

    def both(name: str, path: str, body: dict[str, Any]) -> tuple[Any, Any]:
        body = {"model": model, "temperature": 0, **body}
        r, s = real.post(path, json=body), sim.post(path, body)
        assert r.status_code == 200 == s.status_code, (name, r.status_code, r.text[:500], s.status_code, s.text[:500])
        if body.get("stream"):
            return sse(r.text), sse(s.text)
        return r.json(), s.json()

    def compare(name: str, real_value: Any, sim_value: Any) -> None:
        seen[name] = real_value
        if real_value != sim_value:
            mismatches.append(f"{name}:\n  vLLM: {json.dumps(real_value)}\n  sim:  {json.dumps(sim_value)}")

    for rti in (False, True):
        for kind, path, prompt in (
            ("chat", "/v1/chat/completions", {"messages": MESSAGES}),
            ("completion", "/v1/completions", {"prompt": PROMPT}),
        ):
            body = {**prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "return_token_ids": rti}
            name = f"{kind} return_token_ids={rti}"
            r_full, s_full = both(name, path, body)
            compare(f"{name} non-streaming", shape(r_full), shape(s_full))

            r_events, s_events = both(name, path, {**body, "stream": True})  # no usage chunk
            compare(f"{name} stream without usage, chunk shapes", shapes_by_type(r_events), shapes_by_type(s_events))

            stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            r_events, s_events = both(name, path, stream_body)
            compare(f"{name} stream chunk shapes", shapes_by_type(r_events), shapes_by_type(s_events))
            for label, events in (("vLLM", r_events), ("sim", s_events)):
                usage = events[-2]["usage"]
                assert usage["completion_tokens"] == MAX_TOKENS, (label, name, usage)
                if rti:  # usage counts exactly the IDs the stream carried
                    first = events[0] if kind == "chat" else events[0]["choices"][0]
                    assert usage["prompt_tokens"] == len(first["prompt_token_ids"]), (label, name, usage)
                    assert token_ids_streamed(events) == MAX_TOKENS, (label, name, events)

            if kind == "chat" and rti:  # a prompt of token IDs (what a resuming relay sends) to /v1/completions
                ids = r_events[0]["prompt_token_ids"] + [t for e in r_events[1:3] for t in e["choices"][0]["token_ids"]]
                sim_ids = s_events[0]["prompt_token_ids"] + [
                    t for e in s_events[1:3] for t in e["choices"][0]["token_ids"]
                ]
                resumed = {
                    "max_tokens": MAX_TOKENS,
                    "ignore_eos": True,
                    "return_token_ids": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                r_res = sse(
                    real.post("/v1/completions", json={"model": model, "temperature": 0, "prompt": ids, **resumed}).text
                )
                s_res = sse(sim.post("/v1/completions", {"model": model, "prompt": sim_ids, **resumed}).text)
                compare("completion from token ids, stream chunk shapes", shapes_by_type(r_res), shapes_by_type(s_res))
                assert r_res[0]["choices"][0]["prompt_token_ids"] == ids
                assert s_res[0]["choices"][0]["prompt_token_ids"] == sim_ids
                assert r_res[-2]["usage"]["prompt_tokens"] == len(ids)

    # A natural stop (EOS): the final chunk has the same keys (stop_reason may be a number in vLLM).
    stop_body = {
        "messages": STOP_MESSAGES,
        "max_tokens": 64,
        "return_token_ids": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r_stop, s_stop = both("chat natural stop", "/v1/chat/completions", stop_body)
    assert r_stop[-3]["choices"][0]["finish_reason"] == "stop" == s_stop[-3]["choices"][0]["finish_reason"]
    compare(
        "chat natural stop, stream chunk keys", shapes_by_type(r_stop, keys_only), shapes_by_type(s_stop, keys_only)
    )
    for label, events in (("vLLM", r_stop), ("sim", s_stop)):  # the EOS token is streamed and counted
        assert token_ids_streamed(events) == events[-2]["usage"]["completion_tokens"], (label, events)
    print("\nreal vLLM natural-stop final chunk:", json.dumps(r_stop[-3]))

    print("\nreal vLLM shapes:\n" + "\n".join(f"{k}: {json.dumps(v)}" for k, v in seen.items()))
    assert not mismatches, "the simulated engine's wire shapes differ from vLLM's:\n" + "\n".join(mismatches)
