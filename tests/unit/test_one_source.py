"""One source per fact: names (agent/naming.py)."""

from __future__ import annotations

from agent import naming
from agent.engine import config as engine_config
from agent.gateway import config as gateway_config
from agent.local.plan import MeshPlan


def test_instance_id_is_service_node_port():
    assert naming.instance_id("ernie", "gpu-7", 8001) == "ernie-gpu-7-8001"
    cfg = engine_config.build(engine_config.EngineAgentConfig,
                              {"node": "n1", "consul": {"service": "svc"},
                               "engines": [{"kind": "simulated", "port": 8001}]})
    assert cfg.instance_id(cfg.engines[0]) == naming.instance_id("svc", "n1", 8001)
    plan = MeshPlan(engines=2, engine_kind="simulated", node="box", port_offset=10)
    assert plan.instance_id(1) == naming.instance_id("ernie", "box", plan.engine_port(1))


def test_gateways_register_under_one_service_name():
    cfg = gateway_config.build(gateway_config.GatewayConfig, {"name": "gw-a"})
    assert cfg.instance_id == naming.gateway_instance_id("gw-a") == "ernie-gateway-gw-a"

