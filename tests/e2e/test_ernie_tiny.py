"""ERNIE-4.5's architecture served through the whole mesh: `ernie-mesh up --model tiny-ernie`.

tiny-ernie has RANDOM WEIGHTS (agent/tiny_ernie.py): an architecture check of vLLM's
`Ernie4_5ForCausalLM` code path on its CPU build, behind real engine agents, real Consul and real
Envoy with the resuming relays. Its text is noise, so the tests count tokens, never read words.
One mesh of two engines for this module (the kill needs a survivor), stopped at the module's end.
The file's name sorts it before test_relay_vllm.py, the first user of the session's two-engine SmolLM2
mesh: the two meshes' four engines never share the two cores and the memory at once.

1. `up` is healthy with the tiny-ernie model, labelled as random weights; both instances pass
   (vLLM loaded it and the engine agent's canary generated a token); vLLM resolved the
   `Ernie4_5ForCausalLM` architecture; `/v1/models` through Envoy lists `tiny-ernie`.
2. Chat through Envoy with `ignore_eos`: exactly the requested number of tokens, non-streaming
   and streaming.
3. kill -9 of the serving engine mid-stream while other requests run: the stream completes on the
   other engine (one stream id, every token), and no request fails.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest

from agent.local.wait import wait_until
from agent.tiny_ernie import ARCHITECTURE, NAME
from tests.e2e.conftest_up import UpRun, chat_stream, free_offset

pytestmark = pytest.mark.timeout(1200)
HEALTHY_TIMEOUT_S = 900.0  # two CPU vLLM engines on a loaded 2-core machine
N_TOKENS = 64
KILL_STREAM_TOKENS = 96
PROMPT = "Tell me about lighthouses."


@pytest.fixture(scope="module")
def ernie_mesh(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("up-tiny-ernie")
    run = UpRun(run_dir, free_offset(run_dir), "--model", NAME, ui=False)
    try:
        run.wait_healthy(HEALTHY_TIMEOUT_S)
        print(
            f"\n[tiny-ernie] mesh of two {ARCHITECTURE} engines (random weights, CPU) healthy "
            f"after {run.healthy_after_s:.0f}s"
        )
        yield run
    finally:
        run.shutdown()


def client(mesh: UpRun) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.plan.api_url, api_key=mesh.plan.api_key(), timeout=300, max_retries=0)


def both_passing(mesh: UpRun) -> bool:
    inst = mesh.agent_instances()
    return len(inst) == 2 and all(i["state"] == "passing" for i in inst.values())


def test_up_serves_the_ernie_architecture_labelled_random_weights(ernie_mesh):
    mesh = ernie_mesh
    assert mesh.healthy["model"] == NAME and mesh.healthy["random_weights"] is True
    assert "RANDOM WEIGHTS" in mesh.stderr_path.read_text(errors="replace")  # the banner says what it is
    instances = mesh.agent_instances()
    assert len(instances) == 2
    for iid, inst in instances.items():
        assert inst["state"] == "passing", (iid, inst)
        assert inst["model"] == NAME
        assert inst["canary_latency_ms"] is not None, f"{iid}: passing without a canary answer"
    logs = sorted(mesh.plan.log_dir.glob("ernie-*.log"))
    assert len(logs) == 2, logs
    for log in logs:
        text = log.read_text(errors="replace")
        assert f"Resolved architecture: {ARCHITECTURE}" in text, f"{log.name} does not show vLLM's ERNIE-4.5 path"
    models = client(mesh).models.list()
    assert [m.id for m in models.data] == [NAME]


def test_chat_through_envoy_with_ignore_eos_returns_exactly_the_requested_tokens(ernie_mesh):
    mesh = ernie_mesh
    started = time.monotonic()
    r = client(mesh).chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=N_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    took = time.monotonic() - started
    assert r.usage.completion_tokens == N_TOKENS and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content  # noise, but text
    started = time.monotonic()
    got = chat_stream(mesh, NAME, PROMPT, N_TOKENS)
    stream_s = time.monotonic() - started
    assert got["finish"] == "length" and len(got["ids"]) == 1
    assert len(got["token_ids"]) == N_TOKENS and got["usage"].completion_tokens == N_TOKENS
    print(
        f"\n[tiny-ernie] {N_TOKENS} tokens through Envoy: non-streaming {took:.2f}s ({N_TOKENS / took:.0f} tok/s), "
        f"streaming {stream_s:.2f}s ({N_TOKENS / stream_s:.0f} tok/s)"
    )


def test_killed_engine_stream_and_requests_fail_over(ernie_mesh):
    mesh = ernie_mesh
    wait_until(lambda: both_passing(mesh), 300, interval_s=0.5, what="both tiny-ernie engines passing")
    killed: dict = {}
    results: list[str] = []
    stop_load = threading.Event()

    def load() -> None:
        """Short requests one after another while the kill happens: each must succeed."""
        c = client(mesh)
        while not stop_load.is_set():
            try:
                r = c.chat.completions.create(
                    model=NAME,
                    messages=[{"role": "user", "content": PROMPT}],
                    max_tokens=8,
                    extra_body={"ignore_eos": True},
                )
                results.append("ok" if r.usage.completion_tokens == 8 else f"short: {r.usage.completion_tokens}")
            except openai.APIError as e:
                results.append(f"failed: {e!r}")

    def kill_a_quarter_in(seen: dict) -> None:
        if not killed and len(seen["token_ids"]) >= KILL_STREAM_TOKENS // 4:
            iid = seen["first_instance"]
            mesh.kill_engine(iid)
            killed.update(instance=iid, after=len(seen["token_ids"]), at=time.monotonic())

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        got = chat_stream(mesh, NAME, PROMPT, KILL_STREAM_TOKENS, on_chunk=kill_a_quarter_in)
        # the load keeps going a little after the kill: requests sent while Consul and Envoy learn of it
        wait_until(
            lambda: time.monotonic() - killed.get("at", 0) > 3 and len(results) >= 3, 120, what="load after the kill"
        )
    finally:
        stop_load.set()
        loader.join(timeout=120)
    assert killed, "the engine was never killed"
    assert len(got["ids"]) == 1 and got["finish"] == "length"
    assert len(got["token_ids"]) == KILL_STREAM_TOKENS and got["usage"].completion_tokens == KILL_STREAM_TOKENS
    assert got["instances"][0] == killed["instance"] and len(got["instances"]) == 2, got["instances"]
    failed = [r for r in results if r != "ok"]
    print(
        f"\n[tiny-ernie] killed {killed['instance']} after {killed['after']} tokens; the stream finished on "
        f"{got['instances'][1]} ({len(got['token_ids'])} tokens, longest gap {got['max_gap_s']:.1f}s); "
        f"{len(results)} requests alongside, {len(failed)} failed"
    )
    assert not failed, failed
