"""Propagation benchmark: a verdict change written to Consul -> Envoy's endpoint set changed.

    python -m bench.propagation [--changes 60] [--instances 3] [--json]

Starts its own `consul agent -dev`, a gateway agent (`ernie-mesh gateway`, real Envoy) and
registers N instances (addresses only: propagation does not need engines, Envoy has no active
health check). Then, one change at a time, cycles instances through draining -> critical ->
passing and measures, for each change, the time from just before the Consul write to the moment
Envoy's admin /clusters shows the new state (polled every millisecond or so). Prints p50/p90/p99
and the agent's own push-latency histogram (change seen -> Envoy ACK) from its /metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from agent.catalog.base import Registration, Verdict, VerdictState
from agent.catalog.consul import ConsulCatalog
from agent.gateway.envoy import EnvoyAdmin
from agent.local.consul_dev import ConsulDev
from agent.local.ports import free_ports
from bench.keys import keys_file

REPO = Path(__file__).resolve().parents[1]
SERVICE = "ernie"
TARGET_P99_S = 0.250
CHANGE_TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0
CYCLE = (VerdictState.DRAINING, VerdictState.CRITICAL, VerdictState.PASSING)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def envoy_view(admin: EnvoyAdmin) -> dict[str, str]:
    """instance -> 'healthy' | 'draining' (absent = removed)."""
    out = {}
    for iid, host in admin.hosts(SERVICE).items():
        flags = host.get("health_flags", "")
        out[iid] = "draining" if "draining" in flags else "healthy" if flags == "healthy" else flags
    return out


def expected_view(states: dict[str, VerdictState]) -> dict[str, str]:
    return {
        iid: {VerdictState.PASSING: "healthy", VerdictState.DRAINING: "draining"}[s]
        for iid, s in states.items()
        if s in (VerdictState.PASSING, VerdictState.DRAINING)
    }


def _shows(admin: EnvoyAdmin, want: dict[str, str]) -> Callable[[], bool]:
    """Envoy's admin /clusters shows exactly `want`."""
    return lambda: envoy_view(admin) == want


def wait_for(cond: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.001) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (OSError, httpx.HTTPError):
            pass  # Envoy not up yet
        time.sleep(interval_s)
    raise SystemExit(f"propagation: timed out waiting for {what}")


def metric(text: str, name: str) -> list[tuple[str, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(name):
            sample, _, value = line.rpartition(" ")
            out.append((sample, float(value)))
    return out


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus-style quantile from cumulative (le, count) buckets (linear within a bucket)."""
    total = buckets[-1][1]
    if total == 0:
        return float("nan")
    rank, prev_le, prev_count = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_count) / max(count - prev_count, 1e-9))
        prev_le, prev_count = le, count
    return prev_le


def run(changes: int, instances: int, workdir: Path) -> dict[str, Any]:
    (workdir / "consul").mkdir(parents=True, exist_ok=True)
    consul = ConsulDev(node="ernie-bench", data_dir=str(workdir / "consul")).start()
    listen, admin_port, xds, metrics_port = free_ports(4)
    gateway = None
    admin = EnvoyAdmin(f"http://127.0.0.1:{admin_port}")
    try:
        catalog = ConsulCatalog(consul.address)
        ports = free_ports(instances)
        ids = [f"{SERVICE}-bench-{p}" for p in ports]
        states = {}
        for iid, port in zip(ids, ports):
            catalog.register(
                Registration(SERVICE, iid, "127.0.0.1", port, ttl_s=3600, deregister_critical_after_s=3600),
                Verdict(VerdictState.PASSING),
            )
            states[iid] = VerdictState.PASSING
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        log = open(workdir / "gateway.log", "ab")
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "gateway",
                "--name",
                "bench",
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
                str(workdir / "gw"),
                "--api-keys",
                keys_file(workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        log.close()
        wait_for(
            lambda: envoy_view(admin) == expected_view(states),
            START_TIMEOUT_S,
            "the gateway's first snapshot",
            interval_s=0.05,
        )
        durations, writes = [], []
        for i in range(changes):
            iid = ids[i % len(ids)]
            nxt = CYCLE[(CYCLE.index(states[iid]) + 1) % len(CYCLE)] if states[iid] in CYCLE else VerdictState.DRAINING
            states[iid] = nxt
            want = expected_view(states)
            t0 = time.perf_counter()
            catalog.set_verdict(iid, Verdict(nxt, "bench"))
            writes.append(time.perf_counter() - t0)
            wait_for(_shows(admin, want), CHANGE_TIMEOUT_S, f"change {i} in envoy")
            durations.append(time.perf_counter() - t0)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        buckets = []
        for sample, value in metric(text, "ernie_gateway_xds_push_latency_seconds_bucket"):
            le = sample.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value))
        return {
            "changes": changes,
            "instances": instances,
            "p50_ms": percentile(durations, 50) * 1000,
            "p90_ms": percentile(durations, 90) * 1000,
            "p99_ms": percentile(durations, 99) * 1000,
            "max_ms": max(durations) * 1000,
            "mean_ms": statistics.fmean(durations) * 1000,
            "consul_write_p50_ms": percentile(writes, 50) * 1000,
            "agent_push_p50_ms": histogram_quantile(buckets, 0.5) * 1000,
            "agent_push_p99_ms": histogram_quantile(buckets, 0.99) * 1000,
            "agent_pushes": buckets[-1][1] if buckets else 0,
        }
    finally:
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
        admin.close()
        consul.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.propagation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--changes", type=int, default=60, help="number of verdict changes (>= 50 for a p99)")
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--workdir", help="keep Consul/gateway files here (default: a temp dir)")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ernie-bench-propagation-"))
    r = run(args.changes, args.instances, workdir)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(
            f"propagation Consul verdict write -> Envoy /clusters, {r['changes']} changes over "
            f"{r['instances']} instances (draining/critical/passing cycle):"
        )
        print(
            f"  p50 {r['p50_ms']:.1f} ms   p90 {r['p90_ms']:.1f} ms   p99 {r['p99_ms']:.1f} ms   "
            f"max {r['max_ms']:.1f} ms   mean {r['mean_ms']:.1f} ms   (target p99 < {TARGET_P99_S * 1000:.0f} ms)"
        )
        print(f"  of which the Consul write itself: p50 {r['consul_write_p50_ms']:.1f} ms")
        print(
            f"  agent push latency (change seen -> Envoy ACK, from /metrics, {r['agent_pushes']:.0f} pushes): "
            f"p50 ~{r['agent_push_p50_ms']:.1f} ms   p99 ~{r['agent_push_p99_ms']:.1f} ms"
        )
        print(f"  logs in {workdir}")
    return 0 if r["p99_ms"] < TARGET_P99_S * 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
