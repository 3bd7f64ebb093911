"""GPU use of an engine's processes through NVML (nvidia-ml-py's `pynvml`), where a GPU exists.

`GpuReader.sample(pids)` returns one `GpuUse` per GPU on which one of `pids` holds memory: the
device's utilisation (NVML's, over its last sample period, shared by everything on that GPU) and
the memory those processes use on it. Without the library, without the NVIDIA driver or without a
GPU it returns nothing, forever after the first try, and never raises: the metrics are then
absent, not zero.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger("agent.engine.gpu")


@dataclass(frozen=True)
class GpuUse:
    index: int  # NVML's device index (as nvidia-smi numbers them)
    utilization: float  # 0-1, the device's
    memory_used_bytes: int  # by the engine's processes on this device
    memory_total_bytes: int


def _load_nvml() -> ModuleType | None:
    try:
        import pynvml  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return None
    mod: ModuleType = pynvml
    return mod


class GpuReader:
    """NVML, initialised on first use; `available` is False once initialisation failed."""

    def __init__(self, nvml: ModuleType | Any | None = None):
        self._nvml: Any = nvml
        self._tried = False
        self.available = False
        self._lock = threading.Lock()

    def _init(self) -> bool:
        if self._tried:
            return self.available
        self._tried = True
        nvml = self._nvml if self._nvml is not None else _load_nvml()
        if nvml is None:
            log.debug("no pynvml (nvidia-ml-py): GPU metrics off")
            return False
        try:
            nvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...: no GPU here
            log.debug("NVML unavailable (%s): GPU metrics off", e)
            return False
        self._nvml = nvml
        self.available = True
        return True

    def sample(self, pids: Iterable[int]) -> list[GpuUse]:
        wanted = set(pids)
        with self._lock:
            if not wanted or not self._init():
                return []
            nvml = self._nvml
            try:
                count = int(nvml.nvmlDeviceGetCount())
            except Exception as e:
                log.debug("NVML device count failed: %s", e)
                return []
            out = []
            for index in range(count):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    procs = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
                    ours = [p for p in procs if int(p.pid) in wanted]
                    if not ours:
                        continue
                    util = nvml.nvmlDeviceGetUtilizationRates(handle)
                    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                except Exception as e:  # a device that went away, a permission: skip it, keep the rest
                    log.debug("NVML read of GPU %d failed: %s", index, e)
                    continue
                used = sum(int(p.usedGpuMemory or 0) for p in ours)  # None where NVML cannot tell per process
                out.append(GpuUse(index, float(util.gpu) / 100.0, used, int(mem.total)))
            return out
