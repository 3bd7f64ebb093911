"""Embedded defaults for running vLLM on this machine (docs/architecture.md §5.4): CPU build flags, or GPU."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from agent.engine.cpu import BIND_VAR, VLLM_CPU_ENV, core_share

DEFAULT_SERVED_MODEL_NAME = "smollm2"
# CPU build: small KV cache, no 92%-of-a-NUMA-node request, eager mode (start-up ~33 s instead of ~150 s).
CPU_VLLM_ARGS = ("--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-model-len", "2048")


def has_cuda_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "GPU" in out


def cpu_bind_env(cpu_index: int | None, count: int) -> dict[str, str]:
    """Engine `cpu_index` of `count` (each under its own engine agent) on its own share of the cores."""
    if cpu_index is None:
        return {}
    return {BIND_VAR: core_share(cpu_index, count)}


def vllm_engine(
    port: int,
    model: str,
    served_model_name: str,
    gpu_index: int | None = None,
    cpu_index: int | None = None,
    engines: int = 1,
    cpu_bind: str | None = None,
) -> dict[str, Any]:
    """An [[engines]] table for engine.toml: CPU flags without a GPU (engine `cpu_index` of `engines`
    on its own share of the cores, or on the cores `cpu_bind` names), one GPU per engine with one."""
    if gpu_index is None:
        bind = {BIND_VAR: cpu_bind} if cpu_bind else cpu_bind_env(cpu_index, engines)
        return {
            "kind": "vllm",
            "port": port,
            "model": model,
            "served_model_name": served_model_name,
            "args": list(CPU_VLLM_ARGS),
            "env": {**VLLM_CPU_ENV, **bind},
        }
    return {
        "kind": "vllm",
        "port": port,
        "model": model,
        "served_model_name": served_model_name,
        "env": {"CUDA_VISIBLE_DEVICES": str(gpu_index)},
    }
