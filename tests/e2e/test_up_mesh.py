"""`ernie-mesh up` with two real vLLM engines (CPU build, the embedded default model): healthy,
listed passing by `ernie-mesh status`, answering through the gateway, a third engine added with
`ernie-mesh add`, and Ctrl-C leaves nothing (the added engine included).

The mesh is the session's shared one (tests/e2e/conftest_up.py); the SIGINT test stops it, so it
runs last in this module, after the UI tests (test_ui_*.py) that share it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import openai
import pytest

from agent.local.wait import wait_until
from tests.e2e.conftest_up import ports_free, vllm_mesh  # noqa: F401  (shared session fixture)

pytestmark = pytest.mark.timeout(1500)  # the first test pays for starting two CPU engines


def status(mesh) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--json", "--consul", mesh.plan.consul_address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_up_prints_one_healthy_json_line_with_the_urls(vllm_mesh):
    ev = vllm_mesh.healthy
    plan = vllm_mesh.plan
    assert ev["urls"]["api"] == plan.api_url
    assert ev["urls"]["ui"] == plan.ui_url
    assert ev["urls"]["consul_ui"] == f"http://{plan.consul_address}/ui"
    assert ev["engine_kind"] == "vllm"
    assert sorted(ev["instances"]) == sorted(plan.instance_id(i) for i in range(2))
    print(f"\n[up] healthy after {ev['seconds']}s by up's clock")


def test_status_lists_two_passing_instances(vllm_mesh):
    # The UI tests may have killed an engine: its agent restarts it, and it must come back passing.
    report = wait_until(
        lambda: (lambda r: r if r["passing"] == 2 else None)(status(vllm_mesh)),
        600,
        interval_s=1,
        what="two passing instances in `ernie-mesh status`",
    )
    assert len(report["instances"]) == 2
    assert {r["verdict"] for r in report["instances"]} == {"passing"}
    assert {r["model"] for r in report["instances"]} == {"smollm2"}
    assert [g["status"] for g in report["gateways"]] == ["passing"]


def test_chat_completion_through_the_gateway_is_sensible(vllm_mesh):
    client = openai.OpenAI(
        base_url=vllm_mesh.plan.api_url, api_key=vllm_mesh.plan.api_key(), timeout=180, max_retries=0
    )
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2",
        temperature=0,
        max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    )
    text = raw.parse().choices[0].message.content
    assert "paris" in text.lower(), text
    assert raw.headers["x-ernie-instance"] in vllm_mesh.healthy["instances"]


def test_a_second_up_on_the_same_ports_fails_with_one_line(vllm_mesh, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "up",
            "--engine-kind",
            "simulated",
            "--no-prometheus",
            "--port-offset",
            str(vllm_mesh.plan.port_offset),
            "--run-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and "port " in lines[0], out.stderr


def test_a_second_up_from_the_same_run_dir_is_refused(vllm_mesh):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "up",
            "--engine-kind",
            "simulated",
            "--no-prometheus",
            "--port-offset",
            "1",
            "--run-dir",
            str(vllm_mesh.run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out
    assert "already running" in out.stderr and "ernie-mesh down" in out.stderr, out.stderr


def test_add_a_real_vllm_engine_to_the_running_mesh(vllm_mesh):
    """`ernie-mesh add` on the running real mesh (issue 15): a third vLLM engine (CPU, the embedded
    model) on the least used core, passing, then answering through the gateway. It is left running:
    the SIGINT test below must stop it with `up`'s own engines (up adopted it)."""
    plan = vllm_mesh.plan
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "agent", "add", "--json", "--run-dir", str(vllm_mesh.run_dir)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-3000:]
    ev = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n[add] real vLLM engine passing {ev['seconds']}s after `add` started it ({took:.0f}s in all)")
    assert ev["event"] == "added" and ev["engine_kind"] == "vllm" and ev["model"] == "smollm2", ev
    assert ev["instance"] == plan.instance_id(2) and ev["placement"].startswith("cores "), ev
    assert "waiting for a first canary generation" in out.stderr  # progress: it took no traffic before
    client = openai.OpenAI(base_url=plan.api_url, api_key=plan.api_key(), timeout=180, max_retries=0)
    served = set()
    for n in range(24):  # each its own conversation: affinity spreads them
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2",
            max_tokens=2,
            messages=[{"role": "user", "content": f"Say {n}."}],
            extra_headers={"x-session-id": f"add-probe-{n}"},
        )
        served.add(raw.headers["x-ernie-instance"])
        if ev["instance"] in served:
            break
    assert ev["instance"] in served, served
    wait_until(lambda: status(vllm_mesh)["passing"] == 3, 60, interval_s=1, what="three passing in `ernie-mesh status`")


def test_sigint_drains_and_stops_everything(vllm_mesh):
    procs = vllm_mesh.processes()
    names = " ".join(p.name for p in procs)
    # up, consul, 2 agents, 2 vLLM, gateway, UI (+ children); the engine added above and its vLLM
    assert len(procs) >= 1 + 1 + 2 + 2 + 1 + 1 + 2, names
    assert "engine-agent-3" in names, names
    assert any("vllm" in p.name for p in procs) or len(procs) >= 10, names
    started = time.monotonic()
    vllm_mesh.signal(signal.SIGINT)
    code = vllm_mesh.wait_exit()
    took = time.monotonic() - started
    events = vllm_mesh.events_until_eof()
    print(f"\n[up] stopped {len(procs)} processes in {took:.1f}s after SIGINT")
    assert code == 0, vllm_mesh.stderr_tail()
    stopped = [e for e in events if e.get("event") == "stopped"]
    assert stopped and stopped[-1]["leftovers"] == [], events  # nothing had to be killed at the end
    left = [p for p in procs if p.alive()]
    assert not left, [(p.name, p.pid) for p in left]
    assert ports_free(vllm_mesh.plan) == []
    log = vllm_mesh.stderr_tail(400)
    stop = log[log.rindex("stopping the mesh") :]  # the order of the stop: UI, engines, gateway, Consul
    assert (
        stop.index("    UI\n")
        < stop.index("draining")
        < stop.index("gateway agent and Envoy")
        < stop.index("    Consul\n")
    )
