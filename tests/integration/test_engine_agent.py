"""Engine agent against a real `consul agent -dev`, supervising simulated engines (issue 2, done-when 1)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from agent.local.ports import free_port
from agent.local.wait import wait_until
from tests.integration.engine_support import EngineAgent, set_sim_fault

SERVICE = "ernie-it-engine"


@pytest.fixture(scope="module")
def agent(consul_session, tmp_path_factory):
    port = free_port()
    a = EngineAgent(
        tmp_path_factory.mktemp("engine-agent"),
        consul_session.address,
        SERVICE,
        engines=[{"kind": "simulated", "port": port, "served_model_name": "sim-model", "args": ["--allow-faults"]}],
    )
    a.engine_port = port
    with a:
        a.wait_state(a.instance_id(port), "passing", timeout_s=60)
        yield a


def test_instance_registered_passing_with_id_meta_and_ttl_check(agent, consul_session):
    iid = agent.instance_id(agent.engine_port)
    assert iid == f"{SERVICE}-it-127.0.0.1-{agent.engine_port}"
    entry = agent.entries()[iid]
    assert entry.status.value == "passing"
    assert entry.address == "127.0.0.1" and entry.port == agent.engine_port
    for key in ("model", "served_model_name", "engine", "engine_version", "zone", "agent_url", "agent_id"):
        assert entry.meta.get(key), f"meta {key} missing: {entry.meta}"
    assert entry.meta["engine"] == "simulated"
    assert entry.meta["served_model_name"] == "sim-model"
    assert entry.meta["agent_url"] == agent.url
    assert "model=sim-model" in entry.tags
    checks = httpx.get(f"{consul_session.url}/v1/agent/checks", timeout=5).json()
    check = checks[f"service:{iid}"]
    assert check["Type"] == "ttl"
    assert check["Status"] == "passing" and check["Output"] == "passing (ok): canary generation ok"
    # the agent's own API agrees
    assert httpx.get(f"{agent.url}/ready/{iid}", timeout=5).status_code == 200
    assert httpx.get(f"{agent.url}/live", timeout=5).json()["status"] == "alive"
    metrics = httpx.get(f"{agent.url}/metrics", timeout=5).text
    assert f'ernie_engine_verdict{{instance_id="{iid}",state="passing"}} 1.0' in metrics


def test_gray_failure_hang_with_health_200_turns_critical_within_10s_and_recovers(agent):
    iid = agent.instance_id(agent.engine_port)
    engine = f"http://127.0.0.1:{agent.engine_port}"
    set_sim_fault(engine, "hang")
    t0 = time.monotonic()
    try:
        assert httpx.get(f"{engine}/health", timeout=5).status_code == 200  # the engine still says it's fine
        entry = agent.wait_state(iid, "critical", timeout_s=10)
        detect_s = time.monotonic() - t0
        assert entry.verdict.cause.value == "hung" and "/health answers" in entry.verdict.reason, entry.verdict
        assert entry.note.startswith("critical (hung): "), entry.note
        assert httpx.get(f"{agent.url}/ready/{iid}", timeout=5).status_code == 503
    finally:
        set_sim_fault(engine, "none")
    agent.wait_state(iid, "passing", timeout_s=15)
    print(f"gray failure detected in {detect_s:.1f}s")


def test_stopped_engine_process_turns_critical_as_stopped_not_on_one_health_timeout_and_recovers(agent):
    """SIGSTOP of the whole simulated engine (one process: its /health stops too). What it shows: the
    agent reads the engine's state 'T' from /proc and says so, and one /health timeout is not yet
    its verdict. (A simulated engine has no model processes, so the CPU-time fact is not exercised
    here: unit tests and docs/vllm-cpu.md's measurement on real vLLM cover it.)"""
    iid = agent.instance_id(agent.engine_port)
    pid = agent.instances()[iid]["pid"]
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        entry = agent.wait_state(iid, "critical", timeout_s=10)
        detect_s = time.monotonic() - t0
        reason = entry.verdict.reason
        assert entry.verdict.cause.value == "hung", entry.verdict
        assert reason.startswith("engine process ") and f"(pid {pid}) stopped (SIGSTOP)" in reason, reason
    finally:
        os.kill(pid, signal.SIGCONT)
    agent.wait_state(iid, "passing", timeout_s=15)
    assert agent.instances()[iid]["pid"] == pid  # the same process, not a restart
    print(f"stopped engine detected in {detect_s:.1f}s")


def test_crashed_engine_goes_critical_then_is_restarted_and_passing(agent):
    iid = agent.instance_id(agent.engine_port)
    engine = f"http://127.0.0.1:{agent.engine_port}"
    pid_before = agent.instances()[iid]["pid"]
    try:
        set_sim_fault(engine, "crash")  # the engine exits at once (it may or may not answer first)
    except httpx.HTTPError:
        pass
    agent.wait_state(iid, "critical", timeout_s=10, cause="exited")
    agent.wait_state(iid, "passing", timeout_s=30)
    info = agent.instances()[iid]
    assert info["restarts"] >= 1
    assert info["pid"] != pid_before
    assert f'ernie_engine_restarts_total{{instance_id="{iid}"}}' in httpx.get(f"{agent.url}/metrics").text


def test_consul_restart_under_the_agent_re_registers_without_duplicates(consul_fresh, tmp_path):
    ports = [free_port(), free_port()]
    a = EngineAgent(tmp_path, consul_fresh.address, SERVICE, engines=[{"kind": "simulated", "port": p} for p in ports])
    with a:
        for p in ports:
            a.wait_state(a.instance_id(p), "passing", timeout_s=60)
        consul_fresh.restart()  # -dev: the new Consul knows nothing
        assert a.entries() == {}
        for p in ports:
            a.wait_state(a.instance_id(p), "passing", timeout_s=20)
        assert sorted(a.entries()) == sorted(a.instance_id(p) for p in ports)
        services = httpx.get(f"{consul_fresh.url}/v1/agent/services", timeout=5).json()
        assert sorted(s for s in services if s.startswith(SERVICE)) == sorted(a.instance_id(p) for p in ports)
        assert a.proc.alive()


def test_consul_down_then_back_agent_keeps_running_and_registers(consul_fresh, tmp_path):
    port = free_port()
    consul_fresh.stop()
    a = EngineAgent(tmp_path, consul_fresh.address, SERVICE, engines=[{"kind": "simulated", "port": port}])
    with a:
        wait_until(
            lambda: a.instances()[a.instance_id(port)]["consul_ok"] is False, 30, what="agent noticing Consul is down"
        )
        assert a.proc.alive()
        consul_fresh.start()
        a.wait_state(a.instance_id(port), "passing", timeout_s=30)


def test_attached_engine_is_registered_and_judged_without_being_supervised(consul_session, tmp_path):
    from agent.sim.process import SimEngineProcess

    port = free_port()
    with SimEngineProcess(port, model="attached-model", allow_faults=True) as engine:
        a = EngineAgent(tmp_path, consul_session.address, SERVICE, node="attach", engines=[{"url": engine.url}])
        iid = a.instance_id(port)
        with a:
            entry = a.wait_state(iid, "passing", timeout_s=30)
            assert entry.meta["served_model_name"] == "attached-model"  # learnt from /v1/models
            assert a.instances()[iid]["kind"] == "attach"
            set_sim_fault(engine.url, "hang")
            a.wait_state(iid, "critical", timeout_s=10, cause="hung")
            set_sim_fault(engine.url, "none")
            a.wait_state(iid, "passing", timeout_s=15)
            assert a.stop() == 0
        assert iid not in a.entries()
        assert engine.is_running()  # not ours to stop


def test_sigterm_drains_stops_engines_and_deregisters(consul_session, tmp_path):
    port = free_port()
    a = EngineAgent(
        tmp_path, consul_session.address, SERVICE, node="term", engines=[{"kind": "simulated", "port": port}]
    )
    iid = a.instance_id(port)
    with a:
        a.wait_state(iid, "passing", timeout_s=60)
        engine_pid = a.instances()[iid]["pid"]
        assert a.stop() == 0  # SIGTERM -> drain -> exit 0
    assert iid not in a.entries()
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(engine_pid, 0)
