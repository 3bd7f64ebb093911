"""Soak: the mesh under steady load for a long time (30 min by default), its processes' memory
and Consul's write rate sampled — a benchmark, not a test.

    python -m bench.soak [--minutes 30] [--warmup-minutes 5] [--sample-s 30] [--json]

Three SIMULATED engines with their engine agents, Consul, the gateway agent with Envoy and its
relays, load from the official openai client (half streaming). Every sample: the RSS of every
process of the mesh, and Consul's raft index (every write goes through it: registrations, TTL
refreshes, verdicts). Growth is measured from the first sample after the warm-up to the last;
the goal is at most 10 % for every process. Figures go to bench/results/soak.json; `python -m
bench --soak` puts them in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.engines import sim_settings
from bench.load import LoadConfig, LoadGenerator, summarize
from bench.mesh import MeshSystem

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
GROWTH_GOAL = 0.10


def progress(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} soak: {msg}", file=sys.stderr, flush=True)


def processes(system: MeshSystem) -> dict[str, int]:
    """name -> pid of every process of the mesh (those running now)."""
    out: dict[str, int] = {}
    consul = getattr(system.consul, "proc", None)
    if consul is not None:
        out["consul"] = consul.pid
    gateway_pid = system.gateway.pid if system.gateway is not None else None
    if gateway_pid:
        out["gateway agent"] = gateway_pid
    envoy = system.envoy_pid()
    if envoy:
        out["envoy"] = envoy
    for i, pid in enumerate(system.relay_pids()):
        out[f"relay {i}"] = pid
    for i, agent in enumerate(system.agents):
        agent_pid = agent.proc.pid if agent.proc is not None else None
        if agent_pid:
            out[f"engine agent {i}"] = agent_pid
        engine = system.engine_pid(i)
        if engine:
            out[f"engine {i}"] = engine
    return out


def raft_index(consul_url: str) -> int:
    stats = httpx.get(f"{consul_url}/v1/agent/self", timeout=5).json().get("Stats", {})
    return int(stats.get("raft", {}).get("last_log_index", 0))


def run(minutes: float, warmup_minutes: float, sample_s: float, workdir: Path) -> dict[str, Any]:
    system = MeshSystem(sim_settings(20.0), 3, workdir / "mesh", progress)
    stop = threading.Event()
    samples: list[dict[str, Any]] = []
    try:
        system.start()
        system.wait_all_in_rotation(120)
        consul_url = system.consul.url
        load = LoadGenerator(LoadConfig(system.base_url, "sim-model", concurrency=8, max_tokens=32)).start()
        t0 = time.monotonic()
        end = t0 + minutes * 60
        while time.monotonic() < end and not stop.is_set():
            rss = {}
            for name, pid in processes(system).items():
                try:
                    rss[name] = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
            samples.append({"t_s": round(time.monotonic() - t0, 1), "rss": rss, "raft_index": raft_index(consul_url)})
            if len(samples) % max(1, int(300 / sample_s)) == 1:
                progress(
                    f"{samples[-1]['t_s'] / 60:5.1f} min: {sum(rss.values()) / 2**20:.0f} MiB in {len(rss)} "
                    f"processes, raft index {samples[-1]['raft_index']}"
                )
            stop.wait(sample_s)
        load.stop()
        outcome = dataclasses.asdict(summarize(load.snapshot(), time.monotonic() - t0))
    finally:
        system.stop()
    return report(samples, outcome, minutes, warmup_minutes, sample_s)


def report(
    samples: list[dict[str, Any]], outcome: dict[str, Any], minutes: float, warmup_minutes: float, sample_s: float
) -> dict[str, Any]:
    after = [s for s in samples if s["t_s"] >= warmup_minutes * 60] or samples
    first, last = after[0], after[-1]
    per_process = {}
    for name in sorted(last["rss"]):
        if name not in first["rss"]:
            continue  # started during the run (a restart): no baseline
        series = [s["rss"][name] for s in after if name in s["rss"]]
        # medians of the first and last three samples: one GC cycle is not growth
        start = statistics.median(series[:3])
        finish = statistics.median(series[-3:])
        per_process[name] = {
            "rss_start_mib": round(start / 2**20, 1),
            "rss_end_mib": round(finish / 2**20, 1),
            "rss_max_mib": round(max(series) / 2**20, 1),
            "growth": round(finish / start - 1, 4) if start else 0.0,
        }
    span_min = (last["t_s"] - first["t_s"]) / 60 or 1.0
    writes_per_min = (last["raft_index"] - first["raft_index"]) / span_min
    return {
        "minutes": minutes,
        "warmup_minutes": warmup_minutes,
        "sample_s": sample_s,
        "samples": len(samples),
        "processes": per_process,
        "worst_growth": max((p["growth"] for p in per_process.values()), default=0.0),
        "growth_goal": GROWTH_GOAL,
        "consul_writes_per_min": round(writes_per_min, 1),
        "load": outcome,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--warmup-minutes", type=float, default=5.0)
    p.add_argument("--sample-s", type=float, default=30.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ernie-bench-soak-"))
    r = run(args.minutes, args.warmup_minutes, args.sample_s, workdir)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(r, indent=2) + "\n")
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"soak {r['minutes']:.0f} min (growth after {r['warmup_minutes']:.0f} min warm-up; goal <= 10 %):")
    for name, m in r["processes"].items():
        print(f"  {name:<16} {m['rss_start_mib']:7.1f} -> {m['rss_end_mib']:7.1f} MiB  {m['growth'] * 100:+6.1f} %")
    print(f"  Consul writes {r['consul_writes_per_min']:.1f}/min; load: {json.dumps(r['load'])}")
    return 0 if r["worst_growth"] <= GROWTH_GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
