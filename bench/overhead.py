"""Proxy overhead: the same zero-delay simulated engines reached directly, through the gateway's
Envoy alone, through the gateway as users run it (Envoy + the resuming relay) and through the
baseline's nginx, at a fixed concurrency.

    python -m bench.overhead [--concurrency 16] [--seconds 6] [--rounds 5] [--json]

Three simulated engines (token delay 0: the engine answers as fast as it can), registered in a
Consul dev agent as passing (no engine agent: no canary traffic), one gateway agent with Envoy,
and the baseline's nginx (bench/baseline) over the same ports. A light asyncio httpx client
(one process, keep-alive) sends non-streaming and streaming chat completions; "direct" spreads
requests round-robin over the engines itself. "envoy" and "envoy+relay" are the same gateway: the
share of generation requests sent through the relay is switched between 0 and 100 % through
Envoy's runtime (`ernie.relay.percent`) before each measurement. Paths are measured in rotating order for several
rounds; figures are medians over rounds (the machine is shared and noisy). The proxy's CPU time
per request (Envoy's process; nginx's master and workers) is measured too: it depends much less
on what else the machine is doing than latency does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from agent.catalog.base import Registration, Verdict, VerdictState
from agent.catalog.consul import ConsulCatalog
from agent.local.consul_dev import ConsulDev
from agent.local.ports import free_ports
from agent.local.procs import ManagedProcess, mesh_command
from agent.local.wait import wait_until
from bench.baseline.system import Nginx
from bench.engines import PlainEngine, sim_settings
from bench.load import percentile
from bench.keys import AUTH, keys_file

SERVICE = "ernie"
ENGINES = 3
MAX_TOKENS = 16
WARMUP_S = 1.0
PATHS = ("direct", "envoy", "envoy+relay", "nginx")
PROXIES = PATHS[1:]


def progress(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} overhead: {msg}", file=sys.stderr, flush=True)


def body(stream: bool) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": stream,
    }


async def measure(
    urls: list[str], concurrency: int, seconds: float, stream: bool, procs: Sequence[psutil.Process] = ()
) -> dict[str, Any]:
    """Closed loop: `concurrency` tasks, each one request after the other, for `seconds`."""
    lat: list[float] = []
    errors = 0
    counter = 0
    events = 0
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(limits=limits, timeout=30, headers=AUTH) as client:

        async def one() -> None:
            nonlocal counter, errors, events
            url = urls[counter % len(urls)] + "/v1/chat/completions"
            counter += 1
            t = time.perf_counter()
            try:
                if stream:
                    async with client.stream("POST", url, json=body(True)) as r:
                        async for piece in r.aiter_raw():
                            events += piece.count(b"data: ")
                        ok = r.status_code == 200
                else:
                    r = await client.post(url, json=body(False))
                    ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                lat.append(time.perf_counter() - t)
            else:
                errors += 1

        async def worker(until: float, record: bool) -> None:
            while time.perf_counter() < until:
                await one()

        end = time.perf_counter() + WARMUP_S
        await asyncio.gather(*(worker(end, False) for _ in range(concurrency)))
        lat.clear()
        errors = events = 0
        cpu0 = cpu_s(procs)
        t0 = time.perf_counter()
        end = t0 + seconds
        await asyncio.gather(*(worker(end, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        cpu = cpu_s(procs) - cpu0
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    if p50 is None or p99 is None:
        raise RuntimeError(f"overhead: no request to {urls} succeeded ({errors} errors)")
    # the proxy's CPU per request is far less sensitive to a shared machine than latency
    return {
        "requests": len(lat),
        "errors": errors,
        "rps": len(lat) / elapsed,
        "p50_ms": p50 * 1000,
        "p99_ms": p99 * 1000,
        "proxy_cpu_ms_per_req": cpu / max(len(lat), 1) * 1000,
        "events_per_req": events / max(len(lat), 1) if stream else 0.0,
    }


def cpu_s(procs: Sequence[psutil.Process]) -> float:
    """User + system CPU seconds of the processes (the warm-up is included; it is short)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Rig:
    """Engines + Consul + gateway + nginx, all on loopback."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        ports = free_ports(ENGINES)
        self.engines = [PlainEngine(sim_settings(0.0), p, workdir / "logs", i, len(ports)) for i, p in enumerate(ports)]
        listen, admin, xds, metrics, nginx_port = free_ports(5)
        self.gw_ports = (listen, admin, xds, metrics)
        self.nginx = Nginx(workdir / "nginx", nginx_port, [f"127.0.0.1:{p}" for p in ports])
        (workdir / "consul").mkdir(parents=True, exist_ok=True)
        self.consul = ConsulDev(node="ernie-overhead", data_dir=str(workdir / "consul"))
        self.gateway: ManagedProcess | None = None

    @property
    def urls(self) -> dict[str, list[str]]:
        gw = [f"http://127.0.0.1:{self.gw_ports[0]}"]
        return {"direct": [e.url for e in self.engines], "envoy": gw, "envoy+relay": gw, "nginx": [self.nginx.url]}

    def route(self, path: str) -> None:
        """Send generation requests through the relay (envoy+relay) or straight to the engines."""
        if path in ("envoy", "envoy+relay"):
            percent = 100 if path == "envoy+relay" else 0
            r = httpx.post(
                f"http://127.0.0.1:{self.gw_ports[1]}/runtime_modify?ernie.relay.percent={percent}", timeout=5
            )
            r.raise_for_status()

    def relay_processes(self) -> list[psutil.Process]:
        out = []
        for rec in sorted((self.workdir / "gateway").glob("relay-*.json")):
            try:
                out.append(psutil.Process(json.loads(rec.read_text())["pid"]))
            except (OSError, ValueError, KeyError, psutil.Error):
                pass
        return out

    def start(self) -> None:
        for e in self.engines:
            e.start()
        for e in self.engines:
            e.wait_ready()
        self.consul.start()
        catalog = ConsulCatalog(self.consul.address)
        for e in self.engines:
            catalog.register(
                Registration(
                    SERVICE,
                    f"{SERVICE}-overhead-{e.port}",
                    "127.0.0.1",
                    e.port,
                    ttl_s=3600,
                    deregister_critical_after_s=3600,
                ),
                Verdict(VerdictState.PASSING),
            )
        listen, admin, xds, metrics = self.gw_ports
        self.gateway = ManagedProcess(
            "gateway",
            mesh_command(
                "gateway",
                "--name",
                "overhead",
                "--consul",
                self.consul.address,
                "--service",
                SERVICE,
                "--listen",
                f"127.0.0.1:{listen}",
                "--envoy-admin",
                f"127.0.0.1:{admin}",
                "--xds",
                f"127.0.0.1:{xds}",
                "--metrics",
                f"127.0.0.1:{metrics}",
                "--run-dir",
                str(self.workdir / "gateway"),
                "--api-keys",
                keys_file(self.workdir),
            ),
            self.workdir / "logs" / "gateway.log",
        ).start()

        def envoy_ready() -> bool:
            text = httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=1).text
            return text.count("::health_flags::healthy") >= ENGINES

        wait_until(envoy_ready, 60, interval_s=0.2, what="Envoy with every engine")
        self.nginx.start()

    def proxy_processes(self, path: str) -> list[psutil.Process]:
        """The processes doing the proxy's work (Envoy; nginx master and workers); none for direct."""
        try:
            if path in ("envoy", "envoy+relay"):
                pid = json.loads((self.workdir / "gateway" / "envoy.json").read_text())["pid"]
                return [psutil.Process(pid)] + (self.relay_processes() if path == "envoy+relay" else [])
            if path == "nginx":
                if self.nginx.proc is None:
                    raise RuntimeError("overhead: nginx was not started")
                master = psutil.Process(self.nginx.proc.popen.pid)
                return [master, *master.children(recursive=True)]
        except (OSError, ValueError, KeyError, psutil.Error):
            pass
        return []

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop(30)
        self.nginx.stop()
        self.consul.stop()
        for e in self.engines:
            e.stop()


def run(concurrency: int = 16, seconds: float = 6.0, rounds: int = 5, workdir: Path | None = None) -> dict[str, Any]:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ernie-bench-overhead-"))
    rig = Rig(workdir)
    try:
        rig.start()
        out: dict[str, Any] = {
            "concurrency": concurrency,
            "seconds": seconds,
            "rounds": rounds,
            "engines": ENGINES,
            "max_tokens": MAX_TOKENS,
        }
        for mode in ("non-streaming", "streaming"):
            per_path: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
            for rnd in range(rounds):
                order = PATHS[rnd % len(PATHS) :] + PATHS[: rnd % len(PATHS)]
                for path in order:
                    rig.route(path)
                    r = asyncio.run(
                        measure(rig.urls[path], concurrency, seconds, mode == "streaming", rig.proxy_processes(path))
                    )
                    if path == "envoy+relay":
                        relay_only = asyncio.run(
                            measure(rig.urls[path], concurrency, seconds, mode == "streaming", rig.relay_processes())
                        )
                        r["relay_cpu_ms_per_req"] = relay_only["proxy_cpu_ms_per_req"]
                        r["relay_cpu_us_per_event"] = (
                            (relay_only["proxy_cpu_ms_per_req"] * 1000 / relay_only["events_per_req"])
                            if mode == "streaming"
                            else 0.0
                        )
                    per_path[path].append(r)
                    progress(
                        f"{mode} round {rnd + 1}/{rounds} {path:<6}: {r['rps']:7.1f} req/s  "
                        f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  proxy CPU "
                        f"{r['proxy_cpu_ms_per_req']:.3f} ms/req  errors {r['errors']}"
                    )
            med = {
                p: {
                    k: statistics.median(x[k] for x in per_path[p])
                    for k in (
                        "rps",
                        "p50_ms",
                        "p99_ms",
                        "proxy_cpu_ms_per_req",
                        "events_per_req",
                        "relay_cpu_ms_per_req",
                        "relay_cpu_us_per_event",
                    )
                    if k in per_path[p][0]
                }
                | {"errors": sum(x["errors"] for x in per_path[p])}
                for p in PATHS
            }
            med["envoy+relay"]["vs_envoy_ratio"] = med["envoy+relay"]["rps"] / med["envoy"]["rps"]
            for proxy in PROXIES:
                med[proxy]["added_p50_ms"] = med[proxy]["p50_ms"] - med["direct"]["p50_ms"]
                med[proxy]["added_p99_ms"] = med[proxy]["p99_ms"] - med["direct"]["p99_ms"]
                med[proxy]["throughput_ratio"] = med[proxy]["rps"] / med["direct"]["rps"]
            out[mode] = med
        return out
    finally:
        rig.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=6.0, help="per path and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = run(args.concurrency, args.seconds, args.rounds)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    for mode in ("non-streaming", "streaming"):
        print(f"{mode} (concurrency {r['concurrency']}, medians of {r['rounds']} rounds):")
        for path in PATHS:
            m = r[mode][path]
            extra = (
                ""
                if path == "direct"
                else (
                    f"  added p50 {m['added_p50_ms']:+.2f} ms  p99 "
                    f"{m['added_p99_ms']:+.2f} ms  "
                    f"throughput x{m['throughput_ratio']:.2f}"
                )
            )
            if path == "envoy+relay":
                extra += (
                    f"  vs envoy alone x{m['vs_envoy_ratio']:.2f}  relay CPU {m['relay_cpu_ms_per_req']:.3f} "
                    f"ms/req, {m['relay_cpu_us_per_event']:.1f} us/event"
                )
            print(
                f"  {path:<11} {m['rps']:7.1f} req/s  p50 {m['p50_ms']:6.2f} ms  p99 {m['p99_ms']:6.2f} ms  "
                f"proxy CPU {m['proxy_cpu_ms_per_req']:.3f} ms/req{extra}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
