"""The resuming relay with real vLLM (CPU build, the embedded model), through the session's shared
`ernie-mesh up` mesh (two engines). One request at a time: vLLM does not promise batch invariance,
so exactness is checked on an otherwise idle pair of engines.

1. kill -9 of the serving engine a third of the way through a temperature-0 stream: one stream id,
   finish_reason "length", every token, and the text after the splice equals the greedy
   continuation the surviving engine gives for exactly the relayed tokens (asked directly).
2. SIGSTOP of the serving engine's worker: the stream completes elsewhere within detection + resume.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

from agent.local.runstate import descendants
from agent.local.wait import wait_until
from tests.e2e.conftest_up import chat_stream, vllm_mesh  # noqa: F401  (shared session fixture)

pytestmark = pytest.mark.timeout(1500)
N_TOKENS = 48
PROMPT = "Write a short story about a lighthouse keeper and a storm."


def both_passing(mesh) -> bool:
    inst = mesh.agent_instances()
    return len(inst) == 2 and all(i["state"] == "passing" for i in inst.values())


def stream(mesh, max_tokens: int = N_TOKENS, on_chunk=None) -> dict:
    return chat_stream(mesh, "smollm2", PROMPT, max_tokens, on_chunk)


def engine_url(mesh, instance_id: str) -> str:
    return mesh.agent_instances()[instance_id]["url"]


def direct_continuation(url: str, token_ids: list[int], max_tokens: int) -> dict:
    r = httpx.post(
        f"{url}/v1/completions",
        timeout=300,
        json={
            "model": "smollm2",
            "prompt": token_ids,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "token_ids": choice["token_ids"]}


def test_killed_engine_stream_continues_token_for_token(vllm_mesh):
    mesh = vllm_mesh
    wait_until(lambda: both_passing(mesh), 900, interval_s=1, what="both engines passing")
    undisturbed = stream(mesh)
    assert undisturbed["finish"] == "length" and len(undisturbed["token_ids"]) == N_TOKENS

    killed = {}

    def kill_a_third_in(seen):
        if not killed and len(seen["token_ids"]) >= N_TOKENS // 3:
            iid = seen["first_instance"]
            mesh.kill_engine(iid)
            killed.update(instance=iid, after=len(seen["token_ids"]))

    got = stream(mesh, on_chunk=kill_a_third_in)
    assert killed, "the engine was never killed"
    assert len(got["ids"]) == 1, f"one stream id, got {got['ids']}"
    assert got["finish"] == "length"
    assert got["usage"].completion_tokens == N_TOKENS and len(got["token_ids"]) == N_TOKENS
    assert got["usage"].prompt_tokens == len(got["prompt_token_ids"])
    assert got["instances"][0] == killed["instance"] and len(got["instances"]) == 2
    [k] = got["splices"]
    assert k >= killed["after"] - 1  # the relay had at least what the client had when the kill came
    survivor = got["instances"][1]
    ref = direct_continuation(engine_url(mesh, survivor), got["prompt_token_ids"] + got["token_ids"][:k], N_TOKENS - k)
    assert got["token_ids"][k:] == ref["token_ids"], "the continuation starts from exactly the relayed tokens"
    prefix_text = got["text"][: len(got["text"]) - len(ref["text"])]
    assert got["text"].endswith(ref["text"]) and prefix_text, (got["text"], ref["text"])
    same = got["token_ids"] == undisturbed["token_ids"]
    print(
        f"\n[relay e2e] killed {killed['instance']} after {killed['after']} tokens seen by the client; "
        f"splice at {k}; continuation on {survivor}; equal to the undisturbed run: {same}"
    )


def test_stopped_worker_stream_completes_elsewhere(vllm_mesh):
    mesh = vllm_mesh
    wait_until(lambda: both_passing(mesh), 900, interval_s=1, what="both engines passing")
    stopped: dict = {}

    def stop_worker(seen):
        if not stopped and len(seen["token_ids"]) >= 4:
            iid = seen["first_instance"]
            pid = mesh.agent_instances()[iid]["pid"]
            kids = descendants([pid])
            assert kids, "vLLM's engine core / worker processes"
            for p in kids:
                os.kill(p, signal.SIGSTOP)
            stopped.update(instance=iid, pids=kids, at=time.monotonic())

    try:
        got = stream(mesh, on_chunk=stop_worker)
    finally:
        for p in stopped.get("pids", []):
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass  # the agent restarted it meanwhile
    assert stopped, "the worker was never stopped"
    assert got["finish"] == "length" and len(got["token_ids"]) == N_TOKENS and len(got["ids"]) == 1
    assert got["instances"][0] == stopped["instance"] and len(got["instances"]) == 2
    # detection by the engine agent (canary + watchdog) plus the relay's rescue; generous on a loaded CPU
    print(
        f"\n[relay e2e] worker of {stopped['instance']} stopped; longest wait between chunks "
        f"{got['max_gap_s']:.1f}s; finished on {got['instances'][1]}"
    )
    assert got["max_gap_s"] <= 15.0


def test_a_long_cold_prefill_is_not_taken_for_a_hang(vllm_mesh):
    """A cold ~1,300-token prompt keeps a CPU engine busy for tens of seconds without moving any vLLM
    counter; the engine's worker is computing, so the verdict must stay passing (no false 'hung'),
    and the request must complete where it started."""
    mesh = vllm_mesh
    wait_until(lambda: both_passing(mesh), 900, interval_s=1, what="both engines passing")
    # ~1,340 tokens (the embedded model's context is 2,048); the unique first words defeat the prefix cache
    body = " ".join(f"The keeper of lighthouse number {i} logged the weather." for i in range(110))
    words = f"Session {time.time_ns()}. {body}"
    client = openai.OpenAI(base_url=mesh.plan.api_url, api_key=mesh.plan.api_key(), timeout=600, max_retries=0)
    states: list[dict[str, str]] = []
    done = {}

    def ask_long():
        try:
            done["r"] = client.chat.completions.create(
                model="smollm2",
                temperature=0,
                max_tokens=4,
                extra_body={"ignore_eos": True},
                messages=[{"role": "system", "content": words}, {"role": "user", "content": "Summarize."}],
            )
        except openai.APIError as e:
            done["error"] = e

    import threading

    t = threading.Thread(target=ask_long, daemon=True)
    started = time.monotonic()
    t.start()
    while t.is_alive():
        states.append({k: v["state"] for k, v in mesh.agent_instances().items()})
        t.join(0.5)
    took = time.monotonic() - started
    assert "r" in done, f"the long request failed: {done.get('error')!r}"
    r = done["r"]
    assert r.choices[0].finish_reason == "length" and r.usage.prompt_tokens > 1000
    seen = {s for snap in states for s in snap.values()}
    print(f"\n[relay e2e] cold prefill of {r.usage.prompt_tokens} tokens took {took:.0f}s; states seen {sorted(seen)}")
    assert seen == {"passing"}, states
    assert len((r.model_extra or {}).get("ernie_instances", [])) == 1, "not moved: it was computing, not hung"
