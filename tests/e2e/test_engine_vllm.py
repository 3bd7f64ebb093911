"""The engine agent with a real vLLM engine (issue 2, done-when 3). Runs last: it drains the engine."""

from __future__ import annotations

import threading

import httpx
import openai

from agent.local.defaults import DEFAULT_SERVED_MODEL_NAME
from agent.local.wait import wait_until


def test_passing_only_after_a_real_canary(vllm_agent):
    # Consul showed the instance as starting (not routable) while vLLM loaded, then passing.
    assert vllm_agent.states_seen[0] == "starting", vllm_agent.notes_seen
    assert vllm_agent.states_seen[-1] == "passing"
    entry = vllm_agent.entries()[vllm_agent.iid]
    assert entry.verdict.reason == "canary generation ok"
    assert entry.meta["engine"] == "vllm"
    assert entry.meta["engine_version"]
    assert entry.meta["served_model_name"] == DEFAULT_SERVED_MODEL_NAME
    assert int(entry.meta["max_model_len"]) == 2048
    metrics = httpx.get(f"{vllm_agent.url}/metrics", timeout=5).text
    prefix = f'ernie_engine_probe_duration_seconds_count{{instance_id="{vllm_agent.iid}",probe="canary"'
    line = next(row for row in metrics.splitlines() if row.startswith(prefix))
    assert float(line.split()[-1]) >= 1


def test_real_chat_completion_is_sensible(vllm_agent):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{vllm_agent.engine_port}/v1", api_key="none", timeout=120)
    r = client.chat.completions.create(
        model=DEFAULT_SERVED_MODEL_NAME,
        temperature=0,
        max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    )
    text = r.choices[0].message.content
    assert "paris" in text.lower(), text


def test_drain_during_long_generation_yields_the_full_completion(vllm_agent):
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{vllm_agent.engine_port}/v1", api_key="none", timeout=300, max_retries=0
    )
    result = {}

    def generate():
        chunks, finish = [], None
        for ev in client.completions.create(
            model=DEFAULT_SERVED_MODEL_NAME,
            prompt="Once upon a time",
            max_tokens=150,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            if ev.choices:
                chunks.append(ev.choices[0].text)
                finish = ev.choices[0].finish_reason or finish
        result.update(finish=finish, text="".join(chunks), n=len([c for c in chunks if c]))

    t = threading.Thread(target=generate)
    t.start()
    wait_until(
        lambda: vllm_agent.instances()[vllm_agent.iid]["running"], 60, interval_s=0.1, what="generation running in vLLM"
    )
    r = vllm_agent.drain(vllm_agent.iid)
    assert r.status_code == 202
    t.join(300)
    assert result["finish"] == "length", result  # never "abort"
    assert result["n"] >= 140, result  # every token arrived (chunks may merge a few)
    wait_until(lambda: vllm_agent.iid not in vllm_agent.entries(), 120, what="instance deregistered")
    assert vllm_agent.instances()[vllm_agent.iid]["state"] == "drained"
