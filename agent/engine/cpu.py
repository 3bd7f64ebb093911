"""Sharing a host's cores between CPU vLLM engines.

vLLM's CPU build pins its worker to cores by VLLM_CPU_OMP_THREADS_BIND; its default (`auto`) picks
the same core for every engine on a host, so two engines share one core and an engine restarting
next to a busy one waits minutes for CPU (docs/vllm-cpu.md). GPU builds ignore the variable.
"""

from __future__ import annotations

import os

BIND_VAR = "VLLM_CPU_OMP_THREADS_BIND"
# CPU builds need a small KV cache (GiB; docs/architecture.md §5.4): every vLLM the agent starts
# gets it unless its env says otherwise, and so do the local mesh's engine tables.
# deploy/ansible/filter_plugins/ernie.py keeps a copy (tests/unit/test_ansible_filters.py).
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def core_share(index: int, count: int, cores: list[int] | None = None) -> str:
    """Engine `index` of `count` on this host: its own contiguous slice of the cores, as vLLM's
    core-list syntax ("0-3", "5"); with more engines than cores, engines share cores round-robin."""
    cores = cores if cores is not None else usable_cores()
    if count >= len(cores):
        return str(cores[index % len(cores)])
    per = len(cores) // count
    mine = cores[index * per : (index + 1) * per]
    return str(mine[0]) if len(mine) == 1 else f"{mine[0]}-{mine[-1]}"


def spread(envs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Give each engine whose environment does not bind it yet its own share of the cores (only
    when there are several: a single engine keeps vLLM's default)."""
    free = [i for i, env in enumerate(envs) if BIND_VAR not in env]
    if len(free) < 2:
        return envs
    out = [dict(env) for env in envs]
    for n, i in enumerate(free):
        out[i][BIND_VAR] = core_share(n, len(free))
    return out


def parse_core_list(text: str) -> list[int]:
    """vLLM's core-list syntax back to cores: "0-3,5" -> [0, 1, 2, 3, 5] (a bad list -> [])."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        return []
    return sorted(set(out))


def format_core_list(cores: list[int]) -> str:
    """[0, 1, 2, 3, 5] -> "0-3,5" (vLLM's syntax; libnuma parses it)."""
    runs: list[list[int]] = []
    for c in sorted(set(cores)):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def least_used_share(held: list[list[int]], cores: list[int] | None = None) -> str:
    """The cores for one more engine beside engines already bound to `held` (each a core list): a
    contiguous window of len(cores) // (engines + 1) cores (at least one) whose cores the running
    engines use least, the first such window on a tie. With free cores, the new engine gets free
    cores; on a full host it shares the least crowded ones."""
    cores = cores if cores is not None else usable_cores()
    use = {c: 0 for c in cores}
    for engine in held:
        for c in engine:
            if c in use:
                use[c] += 1
    want = max(1, len(cores) // (len(held) + 1))
    windows = [cores[i : i + want] for i in range(len(cores) - want + 1)]
    best = min(windows, key=lambda w: sum(use[c] for c in w))
    return format_core_list(best)
