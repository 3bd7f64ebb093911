"""The local mesh's parts table (agent/local/parts.py): order, what a death means, stop timeouts, and
`ernie-mesh down` stopping orphans in the same order as `up`."""

from __future__ import annotations

import signal
import socket
import subprocess

import pytest

from agent.local import down
from agent.local.parts import Need, mesh_parts, part_of, plan_parts, stop_order
from agent.local.plan import DRAIN_DEADLINE_S, MeshPlan, local_node_name
from agent.local.runstate import proc_identity


def names(parts) -> list[str]:
    return [p.name for p in parts]


def test_parts_start_in_order_and_stop_dashboard_and_ui_first_consul_last():
    parts = mesh_parts(engines=2)
    assert names(parts) == ["consul", "engine-agent", "gateway", "ui", "prometheus", "dashboard"]
    assert names(stop_order(parts)) == ["dashboard", "ui", "prometheus", "engine-agent", "gateway", "consul"]


def test_consul_and_gateway_are_vital_engines_ui_dashboard_and_its_prometheus_required():
    need = {p.name: p.need for p in mesh_parts()}
    assert need == {
        "consul": Need.VITAL,
        "gateway": Need.VITAL,
        "engine-agent": Need.REQUIRED,
        "ui": Need.REQUIRED,
        "prometheus": Need.REQUIRED,  # the dashboard reads it
        "dashboard": Need.REQUIRED,
    }
    starting = {p.name for p in mesh_parts() if p.fatal_while_starting}
    running = {p.name for p in mesh_parts() if p.fatal_while_running}
    assert starting == {"consul", "engine-agent", "gateway", "ui", "prometheus", "dashboard"}
    assert running == {"consul", "gateway"}
    without = {p.name: p.need for p in mesh_parts(dashboard=False)}
    assert "dashboard" not in without and without["prometheus"] is Need.OPTIONAL


def test_stop_timeouts():
    timeout = {p.name: p.stop_timeout_s for p in mesh_parts()}
    assert timeout == {
        "dashboard": 10.0,
        "ui": 10.0,
        "prometheus": 10.0,
        "engine-agent": DRAIN_DEADLINE_S + 60.0,
        "gateway": 30.0,
        "consul": 10.0,
    }
    agents = next(p for p in mesh_parts(drain_deadline_s=5.0) if p.name == "engine-agent")
    assert agents.stop_timeout_s == 65.0


def test_the_plan_decides_which_parts_run(tmp_path):
    plan = MeshPlan(engines=3, ui=False, prometheus=False, run_dir=tmp_path, drain_deadline_s=7.0)
    parts = plan_parts(plan)
    assert names(parts) == ["consul", "engine-agent", "gateway"]
    agents = parts[1]
    assert agents.process_names() == ("engine-agent-1", "engine-agent-2", "engine-agent-3")
    assert agents.stop_timeout_s == 67.0
    assert names(plan_parts(MeshPlan(ui=True, prometheus=False, run_dir=tmp_path))) == [
        "consul",
        "engine-agent",
        "gateway",
        "ui",
    ]  # no Prometheus: no dashboard either (it reads Prometheus)
    assert names(plan_parts(MeshPlan(ui=False, dashboard=False, run_dir=tmp_path)))[-1] == "prometheus"
    assert names(plan_parts(MeshPlan(ui=False, run_dir=tmp_path)))[-2:] == ["prometheus", "dashboard"]


def test_a_part_owns_its_processes_not_their_children():
    parts = mesh_parts(engines=2)
    assert part_of(parts, "consul").name == "consul"
    assert part_of(parts, "engine-agent-2").name == "engine-agent"
    assert part_of(parts, "engine-agent-17").name == "engine-agent"  # whatever the number of replicas
    for other in (
        "engine-agent-1/python -m vllm",
        "engine-agent-",
        "engine-agent-x",
        "gateway/envoy",
        "model-prepare",
        "up",
    ):
        assert part_of(parts, other) is None, other
    assert [p.process_names() for p in parts if p.name != "engine-agent"] == [
        ("consul",),
        ("gateway",),
        ("ui",),
        ("prometheus",),
        ("dashboard",),
    ]


def test_stop_messages():
    by_name = {p.name: p for p in mesh_parts()}
    assert (
        by_name["engine-agent"].stop_message(2)
        == "engine agents: draining 2 engine(s) (requests in flight finish), then stopping them"
    )
    assert by_name["gateway"].stop_message(1) == "gateway agent and Envoy"
    assert [p.stop_step for p in stop_order(mesh_parts())] == [
        "",
        "",
        "",
        "draining engines",
        "stopping the gateway",
        "stopping Consul",
    ]


def test_down_stops_in_ups_order_with_ups_timeouts(tmp_path):
    up = stop_order(plan_parts(MeshPlan(run_dir=tmp_path)))
    assert [(p.name, p.stop_timeout_s) for p in down.STOP_ORDER] == [(p.name, p.stop_timeout_s) for p in up]


def test_down_stops_orphaned_parts_in_order_and_leaves_their_children_to_the_sweep():
    names_ = [
        "consul",
        "engine-agent-1",
        "engine-agent-2",
        "gateway",
        "ui",
        "prometheus",
        "model-prepare",
        "engine-agent-1/sleep 60",
    ]
    popens = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in names_]
    try:
        procs = [proc_identity(name, p.pid) for name, p in zip(names_, popens)]
        said: list[str] = []
        down.stop_orphans(procs, said.append)
        assert said == [
            "stopping ui",
            "stopping prometheus",
            "stopping engine-agent-1, engine-agent-2",
            "stopping gateway",
            "stopping consul",
        ]
        alive = [p.name for p in procs if p.alive()]
        assert alive == ["model-prepare", "engine-agent-1/sleep 60"]
    finally:
        for p in popens:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()


@pytest.mark.parametrize(
    "hostname,node",
    [
        ("box.example.org", "box"),
        ("my host!", "my-host-"),
        ("under_score-dash9", "under_score-dash9"),
        ("x" * 50, "x" * 40),
        ("", "local"),
        (".example.org", "local"),
    ],
)
def test_local_node_name(monkeypatch, hostname, node):
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    assert local_node_name() == node
