"""Resource use of each supervised engine, exported on the engine agent's /metrics (docs/metrics.md):

  ernie_engine_cpu_seconds_total{instance_id}            CPU seconds of the engine's processes (this run)
  ernie_engine_memory_rss_bytes{instance_id}             their resident memory, summed
  ernie_engine_processes{instance_id}                    how many processes the engine has
  ernie_engine_gpu_utilization_ratio{instance_id,gpu}    NVML's device utilisation, 0-1 (GPU hosts only)
  ernie_engine_gpu_memory_used_bytes{instance_id,gpu}    GPU memory the engine's processes hold
  ernie_engine_gpu_memory_total_bytes{instance_id,gpu}   that GPU's memory

CPU and memory come from the controllers' last /proc sample (taken every probe, `procfs.read_tree`):
the API server the agent spawned and every descendant (vLLM's EngineCore and Workers). The GPU
series are read from NVML at scrape time and are absent where no GPU (or no NVML) exists. An
attached engine (not spawned by the agent) has no process tree here: no series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.engine.gpu import GpuReader
from agent.engine.procfs import TreeSample


class ResourceCollector(Collector):
    def __init__(self, samples: Callable[[], Mapping[str, TreeSample | None]], gpu: GpuReader | None = None):
        self.samples = samples  # instance id -> its engine's last process tree (None: none)
        self.gpu = gpu or GpuReader()

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "ernie_engine_cpu_seconds",
            "CPU seconds used by the engine's processes (API server and descendants) since it last started",
            labels=["instance_id"],
        )
        rss = GaugeMetricFamily(
            "ernie_engine_memory_rss_bytes",
            "Resident memory of the engine's processes, summed",
            labels=["instance_id"],
        )
        count = GaugeMetricFamily("ernie_engine_processes", "Processes of the engine", labels=["instance_id"])
        util = GaugeMetricFamily(
            "ernie_engine_gpu_utilization_ratio",
            "Utilisation of a GPU the engine uses (NVML, the whole device), 0-1",
            labels=["instance_id", "gpu"],
        )
        used = GaugeMetricFamily(
            "ernie_engine_gpu_memory_used_bytes",
            "GPU memory held by the engine's processes",
            labels=["instance_id", "gpu"],
        )
        total = GaugeMetricFamily(
            "ernie_engine_gpu_memory_total_bytes", "Memory of a GPU the engine uses", labels=["instance_id", "gpu"]
        )
        for iid, sample in sorted(self.samples().items()):
            if sample is None or sample.root is None:
                continue
            cpu.add_metric([iid], sample.cpu_s)
            rss.add_metric([iid], sample.rss_bytes)
            count.add_metric([iid], len(sample.processes))
            for g in self.gpu.sample(p.pid for p in sample.processes):
                util.add_metric([iid, str(g.index)], g.utilization)
                used.add_metric([iid, str(g.index)], g.memory_used_bytes)
                total.add_metric([iid, str(g.index)], g.memory_total_bytes)
        yield from (cpu, rss, count)
        if self.gpu.available:
            yield from (util, used, total)
