"""Where one more engine of a running local mesh runs (`ernie-mesh add`): a GPU that no running engine
holds, or, without a GPU, the cores the running engines use least.

Pure: fed the running engines' environments (their engine tables' `env`, as written in their
engine.toml) and the GPUs or cores this host has, it decides; `agent/local/engines.py` gathers
them and `gpu_indices` asks nvidia-smi."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent.config import ConfigError
from agent.engine.cpu import BIND_VAR, least_used_share, parse_core_list, usable_cores
from agent.local.defaults import has_cuda_gpu

GPU_VAR = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Placement:
    gpu: int | None = None  # the CUDA device the engine gets alone (CUDA_VISIBLE_DEVICES)
    cpu_bind: str | None = None  # without a GPU: its cores (VLLM_CPU_OMP_THREADS_BIND)

    def describe(self) -> str:
        if self.gpu is not None:
            return f"GPU {self.gpu}"
        return f"cores {self.cpu_bind}" if self.cpu_bind else "any core"


def gpu_indices() -> list[int]:
    """The CUDA GPUs of this host by index (`nvidia-smi -L`: "GPU 0: ..."); [] without one."""
    if not has_cuda_gpu():
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_gpu_list(out)


def parse_gpu_list(nvidia_smi_l: str) -> list[int]:
    out = []
    for line in nvidia_smi_l.splitlines():
        head = line.split(":", 1)[0].split()
        if len(head) == 2 and head[0] == "GPU" and head[1].isdigit():
            out.append(int(head[1]))
    return out


def held_gpus(envs: Iterable[Mapping[str, str]]) -> set[int]:
    """The GPUs the running engines hold: each one's CUDA_VISIBLE_DEVICES ("0", "1,2")."""
    held: set[int] = set()
    for env in envs:
        for item in str(env.get(GPU_VAR, "")).split(","):
            if item.strip().isdigit():
                held.add(int(item))
    return held


def held_cores(envs: Iterable[Mapping[str, str]], cores: Sequence[int]) -> list[list[int]]:
    """Each running CPU engine's cores: its VLLM_CPU_OMP_THREADS_BIND, or every core when it has none
    (vLLM's `auto` then picks for itself)."""
    out = []
    for env in envs:
        bound = parse_core_list(str(env[BIND_VAR])) if BIND_VAR in env else []
        out.append(bound or list(cores))
    return out


def place(running: Sequence[Mapping[str, str]], gpus: Sequence[int], cores: Sequence[int] | None = None) -> Placement:
    """The placement of one more vLLM engine beside the `running` vLLM engines' environments.

    With GPUs: the first one no running engine holds; none free -> ConfigError (a second vLLM on a
    GPU would not find the memory vLLM reserves). Without: the least used share of the cores."""
    if gpus:
        held = held_gpus(running)
        free = [g for g in gpus if g not in held]
        if not free:
            raise ConfigError(
                f"no free GPU: the running engines hold all {len(gpus)} ({', '.join(map(str, sorted(held)))}); "
                "remove one first (`ernie-mesh remove <instance-id>`)"
            )
        return Placement(gpu=free[0])
    all_cores = list(cores) if cores is not None else usable_cores()
    return Placement(cpu_bind=least_used_share(held_cores(running, all_cores), all_cores))
