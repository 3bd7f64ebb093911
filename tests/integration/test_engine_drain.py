"""Drain under load (issue 2, done-when 2): nothing in flight is lost or truncated."""

from __future__ import annotations

import os
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
                    "--token-file",
                    agent.token_file,
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
        drain_quiet_s=3.0,
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


QUIET_S = 3.0  # EngineAgentConfig.drain_quiet_s's default (tests/unit/test_engine_drain_quiet.py)


def test_a_drain_waits_while_requests_keep_arriving_and_stops_a_quiet_period_after_the_last(consul_session, tmp_path):
    """Consul without a leader: the local agent accepts `draining` but the gateways never see it and
    keep routing here (here: requests sent straight to the engine). Before: the drain stopped the
    engine at the first idle moment between two requests (two idle /metrics readings 0.2 s apart),
    and the next request found it gone."""
    from agent import pids

    port = free_port()
    agent = EngineAgent(
        tmp_path,
        consul_session.address,
        SERVICE,
        node="quiet",
        drain_deadline_s=120.0,
        engines=[
            {
                "kind": "simulated",
                "port": port,
                "served_model_name": "sim-model",
                "args": ["--token-delay-ms", "10"],
                "shutdown_timeout_s": 0,
            }
        ],
    )
    iid = agent.instance_id(port)
    engine_url = f"http://127.0.0.1:{port}"
    body = {"model": "sim-model", "prompt": "Hello", "max_tokens": 3}
    answers: list[tuple[object, float]] = []  # (status or error, when it ended)
    stop = threading.Event()

    def keep_sending() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    status: object = client.post(f"{engine_url}/v1/completions", json=body).status_code
                except httpx.HTTPError as e:
                    status = f"{type(e).__name__}: {e}"
                answers.append((status, time.monotonic()))
                stop.wait(0.7)  # idle gaps longer than the old drain's two readings

    with agent:
        agent.wait_state(iid, "passing", timeout_s=60)
        engine = agent.instances()[iid]["pid"]
        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        wait_until(lambda: len(answers) >= 2, 10, what="requests answered before the drain")
        agent.drain(iid).raise_for_status()
        agent.wait_state(iid, "draining", timeout_s=10)
        # requests keep arriving for a while: the engine must stay
        arriving_until = time.monotonic() + 3 * QUIET_S
        while time.monotonic() < arriving_until:
            assert pids.alive(engine), f"engine stopped while requests kept arriving: {answers[-3:]}"
            time.sleep(0.1)
        stop.set()
        sender.join(timeout=15)
        last_s = answers[-1][1]
        wait_until(lambda: not pids.alive(engine), QUIET_S + 10, what="the drained engine stopped")
        stopped_after_s = time.monotonic() - last_s
        wait_until(lambda: iid not in agent.entries(), 10, what=f"{iid} deregistered")
    print(f"engine stopped {stopped_after_s:.2f}s after the last of {len(answers)} requests")
    assert [a for a, _ in answers if a != 200] == [], answers
    assert len(answers) >= 3 * QUIET_S / 0.8
    # it stopped a quiet period after the last request (polls every 0.2 s; the stop itself is quick)
    assert QUIET_S - 0.3 <= stopped_after_s <= QUIET_S + 2.0, stopped_after_s


def test_ernie_mesh_drain_without_the_control_token_is_refused_and_nothing_drains(consul_session, tmp_path):
    """Issue 11 item 6. Failed before: the agent drained for anyone who could reach it."""
    port = free_port()
    agent = EngineAgent(tmp_path, consul_session.address, SERVICE, engines=[{"kind": "simulated", "port": port}])
    iid = agent.instance_id(port)
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    wrong.chmod(0o600)

    def drain(*extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ERNIE_MESH_CONTROL_TOKEN")}
        cmd = [sys.executable, "-m", "agent", "drain", iid, "--consul", consul_session.address, "--service", SERVICE]
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=60, env=env)

    with agent:
        agent.wait_state(iid, "passing", timeout_s=60)
        for extra in ((), ("--token-file", str(wrong))):
            out = drain(*extra)
            assert out.returncode == 2, out
            assert "refused the drain (HTTP 401)" in out.stderr and "control token" in out.stderr, out.stderr
        assert agent.drain(iid, token="guess").status_code == 401
        assert agent.entries()[iid].verdict.state.value == "passing"  # nothing drained
        assert "missing or wrong control token" in agent.proc.log_tail()
        out = drain("--token-file", agent.token_file, "--no-wait")
        assert out.returncode == 0, out.stderr
        agent.wait_state(iid, "draining", timeout_s=10)
        wait_until(lambda: iid not in agent.entries(), 60, what=f"{iid} drained and deregistered")
