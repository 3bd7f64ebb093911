"""`ernie-mesh up --engine-kind simulated` (fast, no vLLM) stopped by `ernie-mesh down`, and `down`
cleaning up after an `up` that was killed (SIGKILL): no process of the mesh may remain."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import pytest

from tests.e2e.conftest_up import UpRun, free_offset, ports_free

pytestmark = pytest.mark.timeout(600)
START_TIMEOUT_S = 180.0


def down(run: UpRun) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "down", "--json", "--run-dir", str(run.run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def sim_run(tmp_path):
    run = UpRun(
        tmp_path / "run", free_offset(tmp_path / "run", engine_kind="simulated", ui=False), kind="simulated", ui=False
    )
    try:
        run.wait_healthy(START_TIMEOUT_S)
        yield run
    finally:
        run.shutdown()


def test_simulated_mesh_is_labelled_and_answers(sim_run):
    assert sim_run.healthy["engine_kind"] == "simulated" and sim_run.healthy["model"] == "simulated"
    r = httpx.post(
        f"{sim_run.plan.api_url}/chat/completions",
        timeout=30,
        headers={"Authorization": f"Bearer {sim_run.plan.api_key()}"},
        json={"model": "simulated", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert r.status_code == 200 and r.headers["x-ernie-instance"] in sim_run.healthy["instances"]
    assert "SIMULATED" in sim_run.stderr_path.read_text()


def test_down_stops_a_running_up(sim_run):
    procs = sim_run.processes()
    result = down(sim_run)
    assert result["stopped"] and result["survivors"] == [] and result["killed"] == [], result
    assert sim_run.wait_exit(30) == 0
    assert [p for p in procs if p.alive()] == []
    assert ports_free(sim_run.plan) == []
    again = down(sim_run)  # nothing left to stop: still a success
    assert again["stopped"] is False


def test_down_cleans_up_after_a_killed_up(sim_run):
    from agent.local.runstate import read_state
    from agent.local.wait import wait_until

    # up records its children's children (the engines) in the state file within a few seconds
    wait_until(
        lambda: len(read_state(sim_run.plan.state_path).processes) >= 1 + 2 + 2 + 1,
        30,
        interval_s=0.2,
        what="engines recorded in the state file",
    )
    procs = sim_run.processes()
    sim_run.signal(signal.SIGKILL)  # `up` dies without stopping anything: its parts are orphans
    assert sim_run.wait_exit(10) == -signal.SIGKILL
    assert any(p.alive() for p in procs)
    result = down(sim_run)
    assert result["survivors"] == [], result
    assert [p for p in procs if p.alive()] == []
    assert ports_free(sim_run.plan) == []


def test_the_local_consul_denies_by_default_and_each_part_has_its_own_token(sim_run):
    """ACLs on in `up`'s Consul (issue 11): without a token nothing registers; the engine agents and
    the gateway registered with their own tokens (they are passing); the catalog reads anonymously
    (DNS, status, Prometheus)."""
    consul = f"http://{sim_run.plan.consul_address}"
    intruder = {"Name": "ernie", "ID": "ernie-intruder", "Address": "127.0.0.1", "Port": 1}
    assert httpx.put(f"{consul}/v1/agent/service/register", json=intruder, timeout=10).status_code == 403
    tokens = sim_run.plan.consul_acl
    engine = httpx.put(
        f"{consul}/v1/agent/service/register",
        json={**intruder, "Name": "ernie-gateway", "ID": "ernie-gateway-intruder"},
        headers={"X-Consul-Token": tokens.secret("engine")},
        timeout=10,
    )
    assert engine.status_code == 403  # an engine host's token writes engines, not gateways
    passing = httpx.get(f"{consul}/v1/health/service/ernie?passing", timeout=10).json()
    assert len(passing) == len(sim_run.healthy["instances"])
    assert all((tokens.path(r).stat().st_mode & 0o077) == 0 for r in ("management", "engine", "gateway", "operator"))
