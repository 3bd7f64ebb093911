"""One source per fact: names (agent/naming.py), vLLM's CPU environment (agent/engine/cpu.py), duration
strings (agent/durations.py), the can-I-listen check (agent/net.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from agent import naming
from agent.engine import config as engine_config
from agent.engine.cpu import VLLM_CPU_ENV
from agent.gateway import config as gateway_config
from agent.local.plan import MeshPlan


def test_instance_id_is_service_node_address_port(tmp_path):
    assert naming.instance_id("ernie", "gpu-7", "10.0.0.7", 8001) == "ernie-gpu-7-10.0.0.7-8001"
    assert naming.instance_id("ernie", "gpu-7", "[2001:db8::7]", 8001) == "ernie-gpu-7-2001:db8::7-8001"
    cfg = engine_config.build(
        engine_config.EngineAgentConfig,
        {
            "node": "n1",
            "advertise_address": "192.0.2.1",
            "consul": {"service": "svc"},
            "engines": [{"kind": "simulated", "port": 8001, "host": "0.0.0.0"}, {"url": "http://192.0.2.9:8002"}],
        },
    )
    assert cfg.instance_id(cfg.engines[0]) == naming.instance_id("svc", "n1", "192.0.2.1", 8001)
    assert cfg.instance_id(cfg.engines[1]) == naming.instance_id("svc", "n1", "192.0.2.9", 8002)
    plan = MeshPlan(engines=2, engine_kind="simulated", node="box", port_offset=10, run_dir=tmp_path)
    plan.consul_acl.create_secrets()  # the engine agent's Consul token file (up writes it first)
    assert plan.instance_id(1) == naming.instance_id("ernie", "box", "127.0.0.1", plan.engine_port(1))
    # what the plan computes is what its engine agent registers
    agent_cfg = engine_config.build(engine_config.EngineAgentConfig, tomllib.loads(plan.engine_agent_toml(1, "/m")))
    assert agent_cfg.instance_id(agent_cfg.engines[0]) == plan.instance_id(1)


def test_gateways_register_under_one_service_name():
    cfg = gateway_config.build(gateway_config.GatewayConfig, {"name": "gw-a"})
    assert cfg.instance_id == naming.gateway_instance_id("gw-a") == "ernie-gateway-gw-a"


def test_the_local_mesh_and_the_engine_agent_give_cpu_vllm_one_env():
    table = MeshPlan(engines=1).engine_table(0, "/m")
    assert VLLM_CPU_ENV.items() <= table["env"].items()
    from agent.engine import supervisor

    assert supervisor.VLLM_CPU_ENV is VLLM_CPU_ENV
    spec = engine_config.EngineSpec(kind="vllm", port=8001, model="/m")
    assert VLLM_CPU_ENV.items() <= supervisor.engine_env(spec).items()
    # No other copy in agent/ (deploy/ansible/filter_plugins/ernie.py keeps one: tests/unit/test_ansible_filters.py).
    agent_dir = Path(supervisor.__file__).parent.parent
    spelled = {
        p.relative_to(agent_dir).as_posix()
        for p in agent_dir.rglob("*.py")
        if any(name in p.read_text() for name in VLLM_CPU_ENV)
    }
    assert spelled == {"engine/cpu.py"}


def test_durations_in_go_and_protobuf_spelling():
    from agent.durations import go_duration, proto_duration

    # Consul and Prometheus (what the three helpers before wrote for these values)
    assert [go_duration(s) for s in (0.25, 1.0, 1.5, 15.0, 60.0, 90.0, 300.0)] == [
        "250ms",
        "1s",
        "1500ms",
        "15s",
        "1m",
        "90s",
        "5m",
    ]
    assert go_duration(0.0, min_ms=1) == "1ms"
    # Envoy
    assert [proto_duration(s) for s in (0.0, 0.025, 0.25, 1.0, 1.5, 60.0, 300.0)] == [
        "0s",
        "0.025s",
        "0.25s",
        "1s",
        "1.5s",
        "60s",
        "300s",
    ]


def test_one_bind_check_for_every_part():
    import socket

    import pytest

    from agent.config import ConfigError
    from agent.engine.cli import check_listen
    from agent.net import bind_error, can_bind

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert bind_error("127.0.0.1", port) and not can_bind("127.0.0.1", port)
        cfg = engine_config.build(
            engine_config.EngineAgentConfig,
            {"listen": f"127.0.0.1:{port}", "engines": [{"kind": "simulated", "port": 8001}]},
        )
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: "):
            check_listen(cfg)
