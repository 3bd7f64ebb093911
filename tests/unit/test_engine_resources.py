"""The engine agent's resource metrics (agent/engine/resources.py, gpu.py): CPU and memory of each
engine's process tree; GPU series through NVML only where NVML answers (a fake NVML here: these
machines have no GPU), absent without error where it does not (the real pynvml on this machine)."""

from __future__ import annotations

import os
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from agent.engine.gpu import GpuReader
from agent.engine.procfs import ProcStat, TreeSample, read_tree
from agent.engine.resources import ResourceCollector


def scrape(collector: ResourceCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    out = {}
    for family in registry.collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


TREE = TreeSample(
    ProcStat(100, "python", "S", 1, cpu_ticks=100, rss_pages=10),
    (ProcStat(101, "VLLM::EngineCor", "S", 100, cpu_ticks=50, rss_pages=20),),
)


class FakeNvml:
    """Two GPUs; the engine's worker (pid 101) holds 3 GiB on GPU 1; a stranger uses GPU 0."""

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return (
            [SimpleNamespace(pid=555, usedGpuMemory=1 << 30)]
            if h == 0
            else [SimpleNamespace(pid=101, usedGpuMemory=3 << 30)]
        )

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=40 if h == 0 else 87, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=24 << 30, used=4 << 30, free=20 << 30)


def test_cpu_and_memory_of_every_process_of_each_engine():
    page = os.sysconf("SC_PAGE_SIZE")
    got = scrape(ResourceCollector(lambda: {"ernie-a-8001": TREE, "ernie-b-8002": None}, GpuReader(nvml=None)))
    iid = (("instance_id", "ernie-a-8001"),)
    assert got[("ernie_engine_cpu_seconds_total", iid)] == 150 / os.sysconf("SC_CLK_TCK")
    assert got[("ernie_engine_memory_rss_bytes", iid)] == 30 * page
    assert got[("ernie_engine_processes", iid)] == 2
    assert not any(labels == (("instance_id", "ernie-b-8002"),) for _n, labels in got)  # not running: absent


def test_gpu_series_for_the_gpus_the_engine_uses():
    got = scrape(ResourceCollector(lambda: {"ernie-a-8001": TREE}, GpuReader(nvml=FakeNvml())))
    key = (("gpu", "1"), ("instance_id", "ernie-a-8001"))
    assert got[("ernie_engine_gpu_utilization_ratio", key)] == 0.87
    assert got[("ernie_engine_gpu_memory_used_bytes", key)] == 3 << 30
    assert got[("ernie_engine_gpu_memory_total_bytes", key)] == 24 << 30
    assert not any(n.startswith("ernie_engine_gpu") and ("gpu", "0") in labels for n, labels in got)


def test_no_gpu_means_no_gpu_series_and_no_error():
    """This machine: pynvml is installed, the NVIDIA library is not (NVMLError_LibraryNotFound)."""
    me = read_tree(os.getppid())  # a real tree: pytest's parent and this process among its children
    reader = GpuReader()
    collector = ResourceCollector(lambda: {"ernie-real-1": me}, reader)
    text = generate_latest(_registry(collector)).decode()
    assert "ernie_engine_cpu_seconds_total" in text and "ernie_engine_memory_rss_bytes" in text
    assert "ernie_engine_gpu" not in text and reader.available is False
    broken = SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(RuntimeError("Driver Not Loaded")))
    assert GpuReader(nvml=broken).sample([1]) == []


def _registry(collector: ResourceCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry
