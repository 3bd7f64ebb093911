"""Embedded defaults for running vLLM on this machine (DESIGN.md §5): CPU build flags, or GPU."""

from __future__ import annotations

import os
import shutil
import subprocess

DEFAULT_SERVED_MODEL_NAME = "smollm2"
# CPU build: small KV cache, no 92%-of-a-NUMA-node request, eager mode (start-up ~33 s instead of ~150 s).
CPU_VLLM_ARGS = ("--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-model-len", "2048")
CPU_VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def has_cuda_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "GPU" in out


def cpu_bind_env(cpu_index: int | None) -> dict:
    """Pin a CPU engine's worker to its own core. vLLM's default (`auto`) pins every engine's worker
    to core 0: two engines on one host then share one core, and an engine restarting next to a busy
    one waits minutes for CPU (docs/vllm-cpu.md)."""
    if cpu_index is None:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": str(cpu_index % (os.cpu_count() or 1))}


def vllm_engine(port: int, model: str, served_model_name: str, gpu_index: int | None = None,
                cpu_index: int | None = None) -> dict:
    """An [[engines]] table for engine.toml: CPU flags without a GPU (engine `cpu_index` on its own
    core), one GPU per engine with one."""
    if gpu_index is None:
        return {"kind": "vllm", "port": port, "model": model, "served_model_name": served_model_name,
                "args": list(CPU_VLLM_ARGS), "env": {**CPU_VLLM_ENV, **cpu_bind_env(cpu_index)}}
    return {"kind": "vllm", "port": port, "model": model, "served_model_name": served_model_name,
            "env": {"CUDA_VISIBLE_DEVICES": str(gpu_index)}}
