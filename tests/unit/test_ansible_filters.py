"""The Ansible filter plugins run on the controller and import nothing from the package: the facts
they copy must equal the package's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from agent.engine.cpu import VLLM_CPU_ENV

FILTERS = Path(__file__).resolve().parents[2] / "deploy" / "ansible" / "filter_plugins"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"ernie_filter_{name}", FILTERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_vllm_env_is_the_packages():
    ernie = load("ernie")
    assert ernie.VLLM_CPU_ENV == VLLM_CPU_ENV
    [cpu] = ernie.ernie_engine_tables([{"port": 8001, "model": "/m"}], flavor="cpu", cpu_args=["--enforce-eager"])
    assert cpu["env"] == VLLM_CPU_ENV
    [own] = ernie.ernie_engine_tables([{"port": 8001, "model": "/m", "env": {"VLLM_CPU_KVCACHE_SPACE": "4"}}],
                                      flavor="cpu")
    assert own["env"] == {"VLLM_CPU_KVCACHE_SPACE": "4"}
    [gpu] = ernie.ernie_engine_tables([{"port": 8001, "model": "/m"}], flavor="gpu")
    assert "env" not in gpu

