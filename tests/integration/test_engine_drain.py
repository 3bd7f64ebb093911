"""Drain under load (issue 2, done-when 2): nothing in flight is lost or truncated."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from agent.local.ports import free_port
from agent.local.wait import wait_until
from tests.integration.engine_support import EngineAgent

SERVICE = "ernie-it-drain"
TOKENS = 40
CONCURRENCY = 24


def one_request(base_url: str, stream: bool) -> tuple[str, int]:
    """(finish_reason, completion tokens) as a user of the official client sees them."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "count for me"}]
    extra = {"ignore_eos": True}
    if not stream:
        r = client.chat.completions.create(model="sim-model", messages=messages, max_tokens=TOKENS, extra_body=extra)
        return r.choices[0].finish_reason, r.usage.completion_tokens
    chunks, finish = 0, None
    for ev in client.chat.completions.create(
        model="sim-model", messages=messages, max_tokens=TOKENS, extra_body=extra, stream=True
    ):
        if ev.choices and ev.choices[0].delta.content:
            chunks += 1
        if ev.choices and ev.choices[0].finish_reason:
            finish = ev.choices[0].finish_reason
    return finish, chunks


def test_drain_under_load_completes_every_request_in_full(consul_session, tmp_path):
    port = free_port()
    agent = EngineAgent(
        tmp_path,
        consul_session.address,
        SERVICE,
        engines=[
            {
                "kind": "simulated",
                "port": port,
                "served_model_name": "sim-model",
                "args": ["--token-delay-ms", "60"],
                "shutdown_timeout_s": 0,
            }
        ],
    )
    iid = agent.instance_id(port)
    engine = f"http://127.0.0.1:{port}"
    with agent:
        agent.wait_state(iid, "passing", timeout_s=60)
        timeline: dict[str, float] = {}
        stop_watch = threading.Event()

        def watch():
            while not stop_watch.is_set():
                now = time.monotonic()
                entry = agent.entries().get(iid)
                if entry and entry.verdict.state.value == "draining":
                    timeline.setdefault("draining_in_consul", now)
                if entry is None and "draining_in_consul" in timeline:
                    timeline.setdefault("gone_from_consul", now)
                try:
                    httpx.get(f"{engine}/health", timeout=1).raise_for_status()
                except httpx.HTTPError:
                    timeline.setdefault("engine_down", now)
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            futures = [pool.submit(one_request, engine, i % 2 == 0) for i in range(CONCURRENCY)]
            wait_until(
                lambda: httpx.get(f"{engine}/sim/stats", timeout=2).json()["in_flight"] >= CONCURRENCY,
                20,
                what="all requests in flight",
            )
            watcher.start()
            drain = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "agent",
                    "drain",
                    iid,
                    "--consul",
                    consul_session.address,
                    "--service",
                    SERVICE,
                    "--json",
                    "--timeout",
                    "120",
                ],
                capture_output=True,
                text=True,
                timeout=150,
            )
            results = [f.result(timeout=120) for f in futures]
        stop_watch.set()
        watcher.join(5)

        assert drain.returncode == 0, drain.stderr
        assert '"drained": true' in drain.stdout
        # every request that was in flight when the drain started finished with every token
        assert results == [("length", TOKENS)] * CONCURRENCY
        # Consul said "draining" while the engine was still up, and the instance is gone afterwards
        assert "draining_in_consul" in timeline and "engine_down" in timeline, timeline
        assert timeline["draining_in_consul"] < timeline["engine_down"], timeline
        assert iid not in agent.entries()
        assert agent.instances()[iid]["state"] == "drained"


def test_sigterm_before_the_instance_ever_served_does_not_wait_the_drain_deadline(consul_session, tmp_path):
    """Before: the drain counted idle only when /metrics parsed and showed nothing in flight, so an
    engine still loading (its port not bound yet, as vLLM's while it loads the model) kept the agent
    for the whole drain deadline after SIGTERM."""
    port = free_port()
    slow = tmp_path / "slow-start"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(120)  # a model that takes long to load\n")
    agent = EngineAgent(
        tmp_path,
        consul_session.address,
        SERVICE,
        node="early",
        drain_deadline_s=60.0,
        engines=[{"kind": "simulated", "port": port, "env": {"PYTHONPATH": str(slow)}}],
    )
    iid = agent.instance_id(port)
    with agent:
        agent.wait_state(iid, "starting", timeout_s=30, cause="loading")
        time.sleep(1.0)
        t0 = time.monotonic()
        assert agent.stop(timeout_s=90) == 0
        took_s = time.monotonic() - t0
    assert took_s < 20, f"SIGTERM -> exit took {took_s:.1f}s (the drain deadline is 60s)"
    assert iid not in agent.entries()


def test_the_agent_api_answers_during_a_sigterm_drain(consul_session, tmp_path):
    """Before: uvicorn's own SIGTERM handler was still installed (the agent assigned
    `install_signal_handlers`, which uvicorn no longer calls), so the API went down at the signal
    while the drain went on."""
    import signal

    port = free_port()
    agent = EngineAgent(
        tmp_path,
        consul_session.address,
        SERVICE,
        node="api-up",
        drain_settle_s=3.0,
        engines=[{"kind": "simulated", "port": port}],
    )
    iid = agent.instance_id(port)
    with agent:
        agent.wait_state(iid, "passing", timeout_s=60)
        agent.proc.signal(signal.SIGTERM)
        time.sleep(1.0)
        assert agent.proc.alive()
        assert agent.instances()[iid]["state"] == "draining"
        assert agent.proc.wait(30) == 0
    assert iid not in agent.entries()
