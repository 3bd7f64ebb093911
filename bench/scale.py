"""Scale: the gateway with 500 and 2,000 registered instances.

    python -m bench.scale [--sizes 500 2000] [--changes 20] [--json]

Two parts per size:
  pure      the gateway's own modules in-process: catalog entries -> snapshot (build_snapshot) ->
            EDS ClusterLoadAssignment (eds.cluster_load_assignment) -> bytes; medians of repeats.
  live      a Consul dev agent holding N passing instances (addresses only, nothing listens: Envoy
            has no active health check), a real gateway agent (`ernie-mesh gateway`) and its Envoy.
            Measured: time to the first full snapshot in Envoy; then `changes` single-instance
            verdict flips (passing <-> critical), each timed from the Consul write to Envoy's
            membership gauge changing; gateway agent and Envoy CPU per change (process CPU time
            during the changes minus their idle rate); the agent's push latency (its histogram).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

from agent.catalog.base import CatalogEntry, CheckStatus, Registration, Verdict, VerdictState
from agent.catalog.consul import ConsulCatalog
from agent.gateway.eds import cluster_load_assignment
from agent.gateway.snapshot import build_snapshot
from agent.local.consul_dev import ConsulDev
from agent.local.ports import free_ports
from agent.local.procs import ManagedProcess, mesh_command
from agent.local.wait import wait_until
from bench.load import percentile
from bench.keys import keys_file

SERVICE = "ernie"
CLUSTER = "ernie"
PURE_REPEATS = 20
IDLE_WINDOW_S = 5.0
CHANGE_TIMEOUT_S = 15.0
FIRST_PORT = 20000


def progress(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} scale: {msg}", file=sys.stderr, flush=True)


def entries(n: int) -> list[CatalogEntry]:
    meta = {"model": "m", "served_model_name": "m", "zone": "z1", "engine": "vllm"}
    return [
        CatalogEntry(
            f"{SERVICE}-node{i // 8}-{FIRST_PORT + i}",
            f"node{i // 8}",
            f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
            FIRST_PORT + i,
            CheckStatus.PASSING if i % 10 else CheckStatus.WARNING,
            "passing",
            meta,
        )
        for i in range(n)
    ]


def pure(n: int) -> dict[str, Any]:
    es = entries(n)
    build, encode, size = [], [], 0
    for _ in range(PURE_REPEATS):
        t = time.perf_counter()
        snap = build_snapshot(es, CLUSTER).snapshot
        build.append(time.perf_counter() - t)
        t = time.perf_counter()
        blob = cluster_load_assignment(snap).SerializeToString()
        encode.append(time.perf_counter() - t)
        size = len(blob)
    return {
        "build_ms": statistics.median(build) * 1000,
        "encode_ms": statistics.median(encode) * 1000,
        "eds_bytes": size,
    }


def _stats(admin: str) -> dict[str, int]:
    text = httpx.get(f"{admin}/stats", params={"filter": f"^cluster\\.{CLUSTER}\\.membership_"}, timeout=2).text
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if v.strip().isdigit():
            out[k.rsplit(".", 1)[-1]] = int(v)
    return out


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _push_hist(metrics_url: str) -> tuple[float, float]:
    text = httpx.get(metrics_url, timeout=5).text
    s = c = 0.0
    for line in text.splitlines():
        if line.startswith("ernie_gateway_xds_push_latency_seconds_sum"):
            s = float(line.split()[-1])
        elif line.startswith("ernie_gateway_xds_push_latency_seconds_count"):
            c = float(line.split()[-1])
    return s, c


def _membership_is(admin: str, want: int) -> Callable[[], bool]:
    """Envoy's admin shows `want` endpoints in the cluster."""
    return lambda: _stats(admin).get("membership_total") == want


def live(n: int, changes: int, workdir: Path) -> dict[str, Any]:
    (workdir / "consul").mkdir(parents=True, exist_ok=True)
    consul = ConsulDev(node="ernie-scale", data_dir=str(workdir / "consul")).start()
    gateway = None
    try:
        catalog = ConsulCatalog(consul.address)
        ids = [f"{SERVICE}-scale-{FIRST_PORT + i}" for i in range(n)]
        t = time.perf_counter()

        def register(i: int) -> None:
            catalog.register(
                Registration(
                    SERVICE, ids[i], "127.0.0.1", FIRST_PORT + i, ttl_s=3600, deregister_critical_after_s=3600
                ),
                Verdict(VerdictState.PASSING),
            )

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(register, range(n)))
        progress(f"{n} instances registered in {time.perf_counter() - t:.1f}s")
        reads = []
        for _ in range(5):
            t = time.perf_counter()
            catalog.instances(SERVICE)  # what the gateway's watch does on every change
            reads.append(time.perf_counter() - t)
        listen, admin_port, xds, metrics_port = free_ports(4)
        admin = f"http://127.0.0.1:{admin_port}"
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        t0 = time.perf_counter()
        gateway = ManagedProcess(
            "gateway",
            mesh_command(
                "gateway",
                "--name",
                "scale",
                "--consul",
                consul.address,
                "--service",
                SERVICE,
                "--listen",
                f"127.0.0.1:{listen}",
                "--envoy-admin",
                f"127.0.0.1:{admin_port}",
                "--xds",
                f"127.0.0.1:{xds}",
                "--metrics",
                f"127.0.0.1:{metrics_port}",
                "--run-dir",
                str(workdir / "gateway"),
                "--api-keys",
                keys_file(workdir),
            ),
            workdir / "gateway.log",
        ).start()
        wait_until(
            lambda: _stats(admin).get("membership_total") == n, 120, interval_s=0.02, what=f"Envoy with {n} endpoints"
        )
        first_s = time.perf_counter() - t0
        progress(f"{n}: first full snapshot in Envoy after {first_s:.2f}s (gateway agent start included)")
        agent_p = psutil.Process(gateway.pid)
        envoy_pid = json.loads((workdir / "gateway" / "envoy.json").read_text())["pid"]
        envoy_p = psutil.Process(envoy_pid)
        time.sleep(2.0)  # let start-up work settle
        a0, e0, t_idle = _cpu(agent_p), _cpu(envoy_p), time.perf_counter()
        time.sleep(IDLE_WINDOW_S)
        idle_s = time.perf_counter() - t_idle
        agent_idle_rate = (_cpu(agent_p) - a0) / idle_s
        envoy_idle_rate = (_cpu(envoy_p) - e0) / idle_s
        push_sum0, push_count0 = _push_hist(metrics_url)
        a0, e0, t_changes = _cpu(agent_p), _cpu(envoy_p), time.perf_counter()
        durations = []
        total = n
        for k in range(changes):
            iid = ids[(k // 2 * 7) % n]
            to_critical = k % 2 == 0
            total += -1 if to_critical else 1
            t = time.perf_counter()
            catalog.set_verdict(iid, Verdict(VerdictState.CRITICAL if to_critical else VerdictState.PASSING, "bench"))
            wait_until(_membership_is(admin, total), CHANGE_TIMEOUT_S, interval_s=0.002, what=f"change {k} in Envoy")
            durations.append(time.perf_counter() - t)
        span = time.perf_counter() - t_changes
        agent_cpu = (_cpu(agent_p) - a0 - agent_idle_rate * span) / changes
        envoy_cpu = (_cpu(envoy_p) - e0 - envoy_idle_rate * span) / changes
        push_sum, push_count = _push_hist(metrics_url)
        pushes = push_count - push_count0
        p50, p99 = percentile(durations, 50), percentile(durations, 99)
        if p50 is None or p99 is None:
            raise ValueError(f"scale: no change timed (changes={changes})")
        return {
            "consul_read_ms": statistics.median(reads) * 1000,
            "first_snapshot_s": first_s,
            "change_p50_ms": p50 * 1000,
            "change_p99_ms": p99 * 1000,
            "agent_push_mean_ms": (push_sum - push_sum0) / pushes * 1000 if pushes else None,
            "agent_cpu_ms_per_change": max(agent_cpu, 0.0) * 1000,
            "envoy_cpu_ms_per_change": max(envoy_cpu, 0.0) * 1000,
            "agent_idle_cpu_pct": agent_idle_rate * 100,
            "changes": changes,
        }
    finally:
        if gateway is not None:
            gateway.stop(30)
        consul.stop()


def run(
    sizes: tuple[int, ...] = (500, 2000), changes: int = 20, workdir: Path | None = None
) -> dict[str, dict[str, Any]]:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ernie-bench-scale-"))
    out: dict[str, dict[str, Any]] = {}
    for n in sizes:
        r = {"instances": n, **pure(n)}
        progress(
            f"{n}: snapshot build {r['build_ms']:.2f} ms, EDS encode {r['encode_ms']:.2f} ms, "
            f"{r['eds_bytes'] / 1024:.0f} KiB"
        )
        r.update(live(n, changes, workdir / str(n)))
        progress(
            f"{n}: change -> Envoy p50 {r['change_p50_ms']:.1f} ms p99 {r['change_p99_ms']:.1f} ms, "
            f"agent CPU {r['agent_cpu_ms_per_change']:.1f} ms/change, Envoy CPU "
            f"{r['envoy_cpu_ms_per_change']:.1f} ms/change"
        )
        out[str(n)] = r
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = run(tuple(args.sizes), args.changes)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    for n, x in r.items():
        print(
            f"{n:>5} instances: build {x['build_ms']:.2f} ms, encode {x['encode_ms']:.2f} ms "
            f"({x['eds_bytes'] / 1024:.0f} KiB); first snapshot in Envoy {x['first_snapshot_s']:.2f}s; "
            f"change -> Envoy p50 {x['change_p50_ms']:.1f} ms p99 {x['change_p99_ms']:.1f} ms; "
            f"gateway agent CPU {x['agent_cpu_ms_per_change']:.1f} ms/change, Envoy "
            f"{x['envoy_cpu_ms_per_change']:.1f} ms/change"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
