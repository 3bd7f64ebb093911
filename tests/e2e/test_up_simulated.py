"""`ernie-mesh up --engine-kind simulated` (fast, no vLLM) stopped by `ernie-mesh down`; engines added,
scaled and removed on it under load; `down` cleaning up after an `up` that was killed (SIGKILL),
added engines included: no process of the mesh may remain."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from agent.net import can_bind
from tests.e2e.conftest_up import UpRun, free_offset, ports_free, sim_mesh  # noqa: F401 (shared session fixture)

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
def sim_run(tmp_path, request):
    """A mesh of the test's own (it gets stopped); with the dashboard (and Prometheus) when the test
    is marked `with_dashboard`, so `down` is seen stopping those too."""
    dashboard = request.node.get_closest_marker("with_dashboard") is not None
    offset = free_offset(tmp_path / "run", engine_kind="simulated", ui=False, prometheus=dashboard)
    run = UpRun(tmp_path / "run", offset, kind="simulated", ui=False, dashboard=dashboard)
    try:
        run.wait_healthy(START_TIMEOUT_S)
        yield run
    finally:
        run.shutdown()


def test_simulated_mesh_is_labelled_and_answers(sim_mesh):
    assert sim_mesh.healthy["engine_kind"] == "simulated" and sim_mesh.healthy["model"] == "simulated"
    r = httpx.post(
        f"{sim_mesh.plan.api_url}/chat/completions",
        timeout=30,
        headers={"Authorization": f"Bearer {sim_mesh.plan.api_key()}"},
        json={"model": "simulated", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert r.status_code == 200 and r.headers["x-ernie-instance"] in sim_mesh.healthy["instances"]
    assert "SIMULATED" in sim_mesh.stderr_path.read_text()


def test_up_prints_the_dashboard_and_prometheus(sim_mesh):
    """The dashboard is on by default and Prometheus with it; the banner names both, and `top`."""
    urls = sim_mesh.healthy["urls"]
    assert urls["dashboard"] == sim_mesh.plan.dashboard_url and urls["prometheus"] == sim_mesh.plan.prometheus_url
    banner = sim_mesh.stderr_path.read_text()
    assert f"Dashboard    {sim_mesh.plan.dashboard_url}" in banner and "ernie-mesh top --prometheus" in banner
    assert httpx.get(f"{urls['prometheus']}/-/ready", timeout=5).status_code == 200


def test_down_stops_a_running_up(sim_run):
    procs = sim_run.processes()
    result = down(sim_run)
    assert result["stopped"] and result["survivors"] == [] and result["killed"] == [], result
    assert sim_run.wait_exit(30) == 0
    assert [p for p in procs if p.alive()] == []
    assert ports_free(sim_run.plan) == []
    again = down(sim_run)  # nothing left to stop: still a success
    assert again["stopped"] is False


def cli(run: UpRun, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args, "--run-dir", str(run.run_dir)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def last_json(out: subprocess.CompletedProcess) -> dict:
    assert out.stdout.strip(), out
    return json.loads(out.stdout.strip().splitlines()[-1])


def reaches(run: UpRun, instance: str, tries: int = 40) -> bool:
    """A request reaches `instance` (each its own conversation: affinity spreads them)."""
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {run.plan.api_key()}"}) as http:
        for n in range(tries):
            r = http.post(
                f"{run.plan.api_url}/chat/completions",
                headers={"x-session-id": f"probe-{n}"},
                json={"model": "simulated", "messages": [{"role": "user", "content": f"hi {n}"}], "max_tokens": 2},
            )
            if r.status_code == 200 and r.headers.get("x-ernie-instance") == instance:
                return True
    return False


@pytest.mark.with_dashboard
def test_add_remove_scale_under_load_then_down_after_a_killed_up(sim_run):
    """Day two on a running `up` (issue 15), under steady load: `add` an engine (it passes, then takes
    traffic), `scale 4`, `scale 2` (the added ones drained and stopped, newest first), `remove` one
    of `up`'s own; bad input is one line and exit 2; zero failed or truncated requests throughout.
    Then, on the same mesh (one `up` for both stories: CI time), `up` is killed (SIGKILL) with an
    added engine running: `down` stops what `up` left, the added engine included."""
    from agent.local.runstate import read_added, read_state
    from agent.local.wait import wait_until
    from bench.load import LoadConfig, LoadGenerator, summarize

    plan = sim_run.plan
    own = sim_run.healthy["instances"]
    load = LoadGenerator(
        LoadConfig(
            base_url=plan.api_url.removesuffix("/v1"),
            api_key=plan.api_key(),
            model="simulated",
            concurrency=4,
            stream_ratio=0.5,
            max_tokens=16,
        )
    ).start()
    t0 = time.monotonic()
    try:
        started = time.monotonic()
        out = cli(sim_run, "add", "--json")
        add_s = time.monotonic() - started
        assert out.returncode == 0, out
        added = last_json(out)
        assert added["event"] == "added" and added["instance"] not in own and added["routed"], added
        assert "passing" in out.stderr and "no traffic before" in out.stderr  # progress, on stderr with --json
        assert [r.instance_id for r in read_added(plan.run_dir)] == [added["instance"]]
        assert reaches(sim_run, added["instance"])

        scaled = last_json(cli(sim_run, "scale", "4", "--json"))
        assert scaled["passing"] == 4 and len(scaled["added"]) == 1, scaled
        third = next(iter(scaled["added"]))

        removing = time.time()
        down2 = cli(sim_run, "scale", "2", "--json")
        assert down2.returncode == 0, down2
        shrunk = last_json(down2)
        assert list(shrunk["removed"]) == [third, added["instance"]] and shrunk["passing"] == 2, shrunk
        out = cli(sim_run, "remove", own[1], "--json")
        assert out.returncode == 0, out
        removed_s = last_json(out)["removed"][own[1]]
        removing_until = time.time()
        assert read_added(plan.run_dir) == []
        status = subprocess.run(
            [sys.executable, "-m", "agent", "status", "--json", "--consul", plan.consul_address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert [r["id"] for r in json.loads(status.stdout)["instances"]] == [own[0]]
    finally:
        load.stop()
    results = load.snapshot()
    summary = summarize(results, time.monotonic() - t0)
    during_removal = [r for r in results if removing <= r.started <= removing_until]
    print(
        f"\n[add] passing {added['seconds']}s after `add` started it, routed at {added['routed_after_s']}s"
        f" ({add_s:.1f}s with the CLI's own start); scale 2->4 +{scaled['seconds']}s, 4->2 {shrunk['seconds']}s,"
        f" remove {removed_s}s;"
        f" {summary.requests} requests ({len(during_removal)} while removing): {summary.failed} failed,"
        f" {summary.truncated} truncated"
    )
    assert summary.failed == 0 and summary.truncated == 0, summary.errors
    assert len(during_removal) > 20

    # bad input: one line, exit 2
    for args, words in (
        (("remove", "ernie-nope-1"), "no engine 'ernie-nope-1'"),
        (("remove", own[0]), "no passing engine"),  # the last one
        (("add", "--port", str(plan.gateway_port)), f"port {plan.gateway_port} is already in use"),
        (("scale", "0"), "1-64"),
    ):
        out = cli(sim_run, *args)
        assert out.returncode == 2 and words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out
    out = subprocess.run(
        [sys.executable, "-m", "agent", "add", "--run-dir", str(plan.run_dir / "none")], capture_output=True, text=True
    )
    assert out.returncode == 2 and "no running mesh" in out.stderr, out

    # an engine added with another model: the mesh serves two (each model's requests reach its own
    # instances, /v1/models lists both); then `up` killed with it running: `down` stops everything
    extra = last_json(cli(sim_run, "add", "--model", "other-model", "--json"))
    auth = {"Authorization": f"Bearer {plan.api_key()}"}
    wait_until(
        lambda: (
            {m["id"] for m in httpx.get(f"{plan.api_url}/models", headers=auth, timeout=10).json()["data"]}
            == {"simulated", "other-model"}
        ),
        30,
        interval_s=0.2,
        what="both models listed",
    )
    for model, instance in (("other-model", extra["instance"]), ("simulated", own[0])):
        for stream in (False, True):
            r = httpx.post(
                f"{plan.api_url}/chat/completions",
                headers=auth,
                timeout=30,
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3,
                    "stream": stream,
                },
            )
            assert r.status_code == 200 and r.headers["x-ernie-instance"] == instance, (model, r.headers, r.text)
    # up records its children's children (the engines) and the added agent in the state file within seconds
    wait_until(
        lambda: extra["pid"] in {p["pid"] for p in read_state(plan.state_path).processes},
        30,
        interval_s=0.2,
        what="the added engine adopted in the state file",
    )
    procs = sim_run.processes()
    assert any(p.pid == extra["pid"] for p in procs)
    sim_run.signal(signal.SIGKILL)  # `up` dies without stopping anything: its parts are orphans
    assert sim_run.wait_exit(10) == -signal.SIGKILL
    assert any(p.alive() for p in procs)
    result = down(sim_run)
    assert result["survivors"] == [], result
    assert [p for p in procs if p.alive()] == []
    assert ports_free(plan) == [] and can_bind("127.0.0.1", extra["engine_port"])


def test_the_local_consul_denies_by_default_and_each_part_has_its_own_token(sim_mesh):
    """ACLs on in `up`'s Consul (issue 11): without a token nothing registers; the engine agents and
    the gateway registered with their own tokens (they are passing); the catalog reads anonymously
    (DNS, status, Prometheus)."""
    consul = f"http://{sim_mesh.plan.consul_address}"
    intruder = {"Name": "ernie", "ID": "ernie-intruder", "Address": "127.0.0.1", "Port": 1}
    assert httpx.put(f"{consul}/v1/agent/service/register", json=intruder, timeout=10).status_code == 403
    tokens = sim_mesh.plan.consul_acl
    engine = httpx.put(
        f"{consul}/v1/agent/service/register",
        json={**intruder, "Name": "ernie-gateway", "ID": "ernie-gateway-intruder"},
        headers={"X-Consul-Token": tokens.secret("engine")},
        timeout=10,
    )
    assert engine.status_code == 403  # an engine host's token writes engines, not gateways
    passing = httpx.get(f"{consul}/v1/health/service/ernie?passing", timeout=10).json()
    assert len(passing) == len(sim_mesh.healthy["instances"])
    assert all((tokens.path(r).stat().st_mode & 0o077) == 0 for r in ("management", "engine", "gateway", "operator"))
