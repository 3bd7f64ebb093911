"""Proxy overhead: the same zero-delay simulated engines reached directly, through the baseline's
nginx, through the gateway as users run it, and through variants of the gateway's Envoy config
side by side, at a fixed concurrency; what each part of the policy costs per request.

    python -m bench.overhead [--concurrency 16] [--seconds 3] [--rounds 5] [--variants all] [--json]

Three simulated engines (token delay 0: the engine answers as fast as it can), registered in a
Consul dev agent as passing (no engine agent: no canary traffic), one gateway agent with Envoy and
its relay processes (API keys on, as users run it), the baseline's nginx (bench/baseline) over the
same ports, and one Envoy per *variant*: the bootstrap rendered by the agent's own code
(agent/gateway/bootstrap.py) from a GatewayConfig with the relay and API keys off (the bare
routing hop), then one part of the policy taken out, put back or changed. Every variant Envoy
gets its endpoints from the gateway agent's ADS server, like the agent's own Envoy.

Paths:
  direct             the client spreads requests round-robin over the engines itself
  nginx              the naive baseline's nginx (round-robin, keep-alive to the engines)
  edge               the gateway's Envoy as users run it (API keys on), generation routes straight
                     to the engines (the relay's share set to 0 % through Envoy's runtime)
  edge+relay         the same gateway with the generation routes through the resuming relay
                     (100 %): the whole gateway, Envoy (edge + engine hop) and the relay processes
  edge+relay+limits  the same with a key that has request and token limits (the relay's
                     rate-limit check on each request)
  bare ...           variant Envoys (VARIANTS below)

A light asyncio httpx client (one process, keep-alive) sends non-streaming and streaming chat
completions. Paths are measured in rotating order for several rounds; figures are medians over
rounds (the machine is shared and noisy: other people's tests run on the same two cores). The
proxy's CPU time per request (Envoy's process; the relay's processes; nginx's master and
workers) is the figure to read: it depends much less on what else the machine does than latency
or throughput do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from agent.binaries import envoy_binary
from agent.catalog.base import Registration, Verdict, VerdictState
from agent.catalog.consul import ConsulCatalog
from agent.gateway import bootstrap, keys
from agent.gateway.config import EdgeSettings, GatewayConfig, PolicyConfig, RelaySettings
from agent.local.consul_dev import ConsulDev
from agent.local.ports import free_ports
from agent.local.procs import ManagedProcess, mesh_command
from agent.local.wait import wait_until
from bench.baseline.system import Nginx
from bench.engines import PlainEngine, sim_settings
from bench.keys import AUTH, LIMITED_AUTH, keys_file
from bench.load import percentile

SERVICE = "ernie"
CLUSTER = "ernie"
ENGINES = 3
MAX_TOKENS = 16
WARMUP_S = 1.0
MODES = ("non-streaming", "streaming")
REFERENCES = ("direct", "nginx")
GATEWAY_PATHS = ("edge", "edge+relay", "edge+relay+limits")
BARE = "bare"

Bootstrap = dict[str, Any]


def progress(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} overhead: {msg}", file=sys.stderr, flush=True)


# --- variants of the Envoy config -------------------------------------------------------------


def _listener(b: Bootstrap, name: str) -> dict[str, Any]:
    return next(x for x in b["static_resources"]["listeners"] if x["name"] == name)


def _hcm(b: Bootstrap) -> dict[str, Any]:
    typed: dict[str, Any] = _listener(b, "openai_api")["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def _routes(b: Bootstrap) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = _hcm(b)["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def _engine_routes(b: Bootstrap) -> Iterator[dict[str, Any]]:
    """The edge's routes to the engine cluster (generation routes, /v1/models, /health)."""
    for r in _routes(b):
        if r.get("route", {}).get("cluster") == CLUSTER:
            yield r


def _cluster(b: Bootstrap, name: str = CLUSTER) -> dict[str, Any]:
    return next(c for c in b["static_resources"]["clusters"] if c["name"] == name)


def _protocol_options(b: Bootstrap) -> dict[str, Any]:
    opts: dict[str, Any] = _cluster(b)["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    return opts


def no_per_endpoint_stats(b: Bootstrap) -> None:
    _cluster(b).pop("track_cluster_stats", None)


def all_stats(b: Bootstrap) -> None:
    b.pop("stats_config", None)


def no_stats(b: Bootstrap) -> None:
    b["stats_config"] = {"stats_matcher": {"reject_all": True}}


def no_retries(b: Bootstrap) -> None:
    for r in _engine_routes(b):
        r["route"].pop("retry_policy", None)
        r.pop("request_body_buffer_limit", None)


def no_body_buffer_limit(b: Bootstrap) -> None:
    for r in _engine_routes(b):
        r.pop("request_body_buffer_limit", None)


def no_retry_budget(b: Bootstrap) -> None:
    for t in _cluster(b)["circuit_breakers"]["thresholds"]:
        t.pop("retry_budget", None)


def no_outlier_detection(b: Bootstrap) -> None:
    _cluster(b).pop("outlier_detection", None)


def no_circuit_breakers(b: Bootstrap) -> None:
    _cluster(b).pop("circuit_breakers", None)


def no_response_headers(b: Bootstrap) -> None:
    _hcm(b)["route_config"]["virtual_hosts"][0].pop("response_headers_to_add", None)
    for r in _routes(b):
        r.pop("response_headers_to_add", None)


def no_request_id(b: Bootstrap) -> None:
    _hcm(b)["generate_request_id"] = False


def no_receive_timeouts(b: Bootstrap) -> None:
    _hcm(b).pop("request_headers_timeout", None)
    _hcm(b).pop("request_timeout", None)


def no_upstream_socket_options(b: Bootstrap) -> None:
    _cluster(b).pop("upstream_connection_options", None)
    _cluster(b).pop("upstream_bind_config", None)


def round_robin(b: Bootstrap) -> None:
    _cluster(b)["lb_policy"] = "ROUND_ROBIN"


def no_connection_reuse(b: Bootstrap) -> None:
    _protocol_options(b)["common_http_protocol_options"]["max_requests_per_connection"] = 1


def plain_routes(b: Bootstrap) -> None:
    """The allow-list's regex and the relay's runtime-fraction routes replaced by one prefix route."""
    hcm = _hcm(b)
    vhost = hcm["route_config"]["virtual_hosts"][0]
    engine = next(r for r in _engine_routes(b) if "safe_regex" in r["match"])
    vhost["routes"] = [{**engine, "match": {"prefix": "/"}}]


def minimal(b: Bootstrap) -> None:
    """A router and one prefix route to a round-robin cluster; nothing else of the policy."""
    for edit in (
        plain_routes,
        no_stats,
        no_per_endpoint_stats,
        no_retries,
        no_outlier_detection,
        no_circuit_breakers,
        no_response_headers,
        no_request_id,
        no_receive_timeouts,
        no_upstream_socket_options,
        round_robin,
    ):
        edit(b)
    hcm = _hcm(b)
    hcm.pop("local_reply_config", None)
    hcm.pop("stream_idle_timeout", None)
    for r in _routes(b):
        r["route"].pop("idle_timeout", None)


def stock_envoy(b: Bootstrap, engines: Sequence[str]) -> Bootstrap:
    """Not our config at all: Envoy's getting-started shape (listener, router, a static cluster of
    the engines), the same admin and listener addresses. Envoy's own floor on this machine."""
    listener = _listener(b, "openai_api")
    hosts = [e.rsplit(":", 1) for e in engines]
    return {
        "admin": b["admin"],
        "static_resources": {
            "listeners": [
                {
                    "name": "openai_api",
                    "address": listener["address"],
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": _hcm(b)["@type"],
                                        "stat_prefix": "openai_api",
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http"
                                                    ".router.v3.Router"
                                                },
                                            }
                                        ],
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "engines",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": CLUSTER, "timeout": "0s"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": CLUSTER,
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": {"socket_address": {"address": h, "port_value": int(p)}}}}
                                    for h, p in hosts
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


@dataclass(frozen=True)
class Variant:
    """An Envoy rendered by the benchmark: the bare routing hop (relay and API keys off, the shipped
    policy) with `edits` applied, API keys on with `keys`, `concurrency` worker threads."""

    name: str
    what: str
    edits: tuple[Callable[[Bootstrap], None], ...] = ()
    keys: bool = False
    concurrency: int = 0  # Envoy --concurrency; 0: the gateway's default (Envoy's: one per core)
    policy: dict[str, Any] = field(default_factory=dict)  # PolicyConfig overrides
    stock: bool = False  # Envoy's getting-started config instead of ours (stock_envoy)


VARIANTS = (
    Variant(BARE, "the bare routing hop: the shipped policy, relay and API keys off"),
    Variant("bare +api keys", "API key check on (the edge's api_key_auth filter)", keys=True),
    Variant("bare -per-endpoint stats", "no track_cluster_stats.per_endpoint_stats", (no_per_endpoint_stats,)),
    Variant("bare +all stats", "Envoy's whole stats tree (no stats_matcher: policy.envoy_stats = all)", (all_stats,)),
    Variant("bare -stats", "no stats at all (stats_matcher reject_all)", (no_stats,)),
    Variant("bare -request id", "no x-request-id generated (generate_request_id false)", (no_request_id,)),
    Variant("bare -retries", "no retry policy (and no body buffering for retries)", (no_retries,)),
    Variant("bare -buffer limit", "retries kept, no request_body_buffer_limit", (no_body_buffer_limit,)),
    Variant("bare -retry budget", "no retry budget (Envoy's default: 3 concurrent retries)", (no_retry_budget,)),
    Variant("bare -outlier detection", "no outlier_detection", (no_outlier_detection,)),
    Variant("bare -circuit breakers", "no circuit_breakers (Envoy's defaults)", (no_circuit_breakers,)),
    Variant("bare -response headers", "no x-ernie-gateway / x-ernie-instance", (no_response_headers,)),
    Variant("bare -receive timeouts", "no request_headers_timeout / request_timeout", (no_receive_timeouts,)),
    Variant("bare -socket options", "no TCP keepalive / TCP_USER_TIMEOUT upstream", (no_upstream_socket_options,)),
    Variant("bare round robin", "lb_policy ROUND_ROBIN instead of LEAST_REQUEST", (round_robin,)),
    Variant("bare plain routes", "one prefix route instead of the allow-list and relay routes", (plain_routes,)),
    Variant("bare -connection reuse", "one request per upstream connection", (no_connection_reuse,)),
    Variant("bare 1 worker", "--concurrency 1", concurrency=1),
    Variant("minimal", "router, one prefix route, round robin; no stats, retries, headers, timeouts", (minimal,)),
    Variant("stock envoy", "not our config: listener, router, static cluster (Envoy's defaults)", stock=True),
    Variant("stock envoy 1 worker", "the same, --concurrency 1", stock=True, concurrency=1),
)
DEFAULT_VARIANTS = tuple(v.name for v in VARIANTS)


def variant_config(v: Variant, base: GatewayConfig, workdir: Path, listen: int, admin: int) -> GatewayConfig:
    ports = free_ports(1)
    return replace(
        base,
        name=f"overhead-{VARIANTS.index(v)}",
        listen=f"127.0.0.1:{listen}",
        envoy_admin=f"127.0.0.1:{admin}",
        metrics=f"127.0.0.1:{ports[0]}",
        run_dir=str(workdir),
        envoy_concurrency=v.concurrency or base.envoy_concurrency,
        relay=RelaySettings(enabled=False),
        edge=replace(base.edge, api_keys=base.edge.api_keys if v.keys else "off"),
        policy=replace(base.policy, **v.policy),
    )


def render_variant(v: Variant, cfg: GatewayConfig, engines: Sequence[str]) -> str:
    b: Bootstrap = yaml.safe_load(bootstrap.render(Path(cfg.bootstrap_template).read_text(), cfg))
    if v.stock:
        return json.dumps(stock_envoy(b, engines), indent=1)
    # the engine hop is the relay's way in: not used here (and its socket is the gateway's)
    b["static_resources"]["listeners"] = [x for x in b["static_resources"]["listeners"] if x["name"] == "openai_api"]
    for edit in v.edits:
        edit(b)
    return json.dumps(b, indent=1)  # JSON is YAML (and has no anchors to share between edits)


class VariantEnvoy:
    def __init__(self, v: Variant, cfg: GatewayConfig):
        self.variant = v
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.listen}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.cfg.envoy_admin}"

    def start(self, key_set: keys.KeySet, engines: Sequence[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.variant.keys:
            keys.write_files(Path(self.cfg.keys_dir), key_set)
        path = self.dir / "bootstrap.yaml"
        path.write_text(render_variant(self.variant, self.cfg, engines))
        cmd = [envoy_binary(), "-c", str(path), "-l", "warning", "--use-dynamic-base-id"]
        cmd += ["--base-id-path", str(self.dir / "base-id")]
        if self.cfg.envoy_concurrency:
            cmd += ["--concurrency", str(self.cfg.envoy_concurrency)]
        self.proc = ManagedProcess(f"envoy {self.variant.name}", cmd, self.dir / "envoy.log").start()

    def ready(self) -> bool:
        if self.proc is None or not self.proc.alive():
            raise RuntimeError(f"overhead: Envoy {self.variant.name!r} exited: {self.proc and self.proc.log_tail(15)}")
        try:
            text = httpx.get(f"{self.admin_url}/clusters", timeout=1).text
        except httpx.HTTPError:
            return False
        return text.count("::health_flags::healthy") >= ENGINES

    def processes(self) -> list[psutil.Process]:
        if self.proc is None or self.proc.pid is None:
            return []
        return [psutil.Process(self.proc.pid)]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(10)


# --- measuring ---------------------------------------------------------------------------------


def body(stream: bool) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": stream,
    }


async def measure(
    urls: list[str],
    concurrency: int,
    seconds: float,
    stream: bool,
    groups: Mapping[str, Sequence[psutil.Process]] | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Closed loop: `concurrency` tasks, each one request after the other, for `seconds`. CPU is
    measured per group of processes (e.g. {"envoy": [...], "relay": [...]})."""
    groups = groups or {}
    lat: list[float] = []
    errors = 0
    counter = 0
    events = 0
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(limits=limits, timeout=30, headers=headers or AUTH) as client:

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

        async def worker(until: float) -> None:
            while time.perf_counter() < until:
                await one()

        end = time.perf_counter() + WARMUP_S
        await asyncio.gather(*(worker(end) for _ in range(concurrency)))
        lat.clear()
        errors = events = 0
        cpu0 = {g: cpu_s(p) for g, p in groups.items()}
        t0 = time.perf_counter()
        end = t0 + seconds
        await asyncio.gather(*(worker(end) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        cpu = {g: cpu_s(p) - cpu0[g] for g, p in groups.items()}
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    if p50 is None or p99 is None:
        raise RuntimeError(f"overhead: no request to {urls} succeeded ({errors} errors)")
    n = max(len(lat), 1)
    out = {
        "requests": len(lat),
        "errors": errors,
        "rps": len(lat) / elapsed,
        "p50_ms": p50 * 1000,
        "p99_ms": p99 * 1000,
        "events_per_req": events / n if stream else 0.0,
    }
    if groups:
        # the proxy's CPU per request is far less sensitive to a shared machine than latency
        out["proxy_cpu_ms_per_req"] = sum(cpu.values()) / n * 1000
        for g, s in cpu.items():
            out[f"{g}_cpu_ms_per_req"] = s / n * 1000
    return out


def cpu_s(procs: Sequence[psutil.Process]) -> float:
    """CPU seconds of the processes: the scheduler's run time of each thread (nanoseconds,
    /proc/<pid>/task/*/schedstat), where user + system time (psutil) would come in clock ticks
    of 10 ms: too coarse for a few hundred requests on a busy machine."""
    total = 0.0
    for p in procs:
        try:
            tasks = os.listdir(f"/proc/{p.pid}/task")
        except OSError:
            tasks = []
        ns = 0
        for tid in tasks:
            try:
                with open(f"/proc/{p.pid}/task/{tid}/schedstat") as f:
                    ns += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        if ns:
            total += ns / 1e9
            continue
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Rig:
    """Engines + Consul + gateway + nginx + variant Envoys, all on loopback."""

    def __init__(self, workdir: Path, variants: Sequence[Variant]):
        self.workdir = workdir
        ports = free_ports(ENGINES)
        self.engines = [PlainEngine(sim_settings(0.0), p, workdir / "logs", i, len(ports)) for i, p in enumerate(ports)]
        listen, admin, xds, metrics, nginx_port = free_ports(5)
        self.gw_ports = (listen, admin, xds, metrics)
        self.nginx = Nginx(workdir / "nginx", nginx_port, [f"127.0.0.1:{p}" for p in ports])
        (workdir / "consul").mkdir(parents=True, exist_ok=True)
        self.consul = ConsulDev(node="ernie-overhead", data_dir=str(workdir / "consul"))
        self.gateway: ManagedProcess | None = None
        self.keys_file = keys_file(workdir)
        self.key_set = keys.KeySet(tuple(keys.from_file(self.keys_file)))
        base = GatewayConfig(
            name="overhead",
            xds=f"127.0.0.1:{xds}",
            edge=EdgeSettings(api_keys=self.keys_file),
            policy=PolicyConfig(),
        )
        vports = free_ports(2 * len(variants))
        self.variants = {
            v.name: VariantEnvoy(
                v, variant_config(v, base, workdir / "variants" / str(i), vports[2 * i], vports[2 * i + 1])
            )
            for i, v in enumerate(variants)
        }

    def urls(self, path: str) -> list[str]:
        if path == "direct":
            return [e.url for e in self.engines]
        if path == "nginx":
            return [self.nginx.url]
        if path in GATEWAY_PATHS:
            return [f"http://127.0.0.1:{self.gw_ports[0]}"]
        return [self.variants[path].url]

    def headers(self, path: str) -> dict[str, str]:
        return LIMITED_AUTH if path == "edge+relay+limits" else AUTH

    def route(self, path: str) -> None:
        """Send generation requests through the relay (edge+relay...) or straight to the engines."""
        if path in GATEWAY_PATHS:
            percent = 0 if path == "edge" else 100
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
                self.keys_file,
            ),
            self.workdir / "logs" / "gateway.log",
        ).start()

        def envoy_ready() -> bool:
            text = httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=1).text
            return text.count("::health_flags::healthy") >= ENGINES

        wait_until(envoy_ready, 60, interval_s=0.2, what="Envoy with every engine")
        for ve in self.variants.values():
            ve.start(self.key_set, [f"127.0.0.1:{e.port}" for e in self.engines])
        for ve in self.variants.values():
            wait_until(ve.ready, 60, interval_s=0.2, what=f"Envoy {ve.variant.name!r} with every engine")
        self.nginx.start()

    def cpu_groups(self, path: str) -> dict[str, list[psutil.Process]]:
        """The processes doing the proxy's work, by part; none for direct."""
        try:
            if path in GATEWAY_PATHS:
                pid = json.loads((self.workdir / "gateway" / "envoy.json").read_text())["pid"]
                groups = {"envoy": [psutil.Process(pid)]}
                if path != "edge":
                    groups["relay"] = self.relay_processes()
                return groups
            if path == "nginx":
                if self.nginx.proc is None:
                    raise RuntimeError("overhead: nginx was not started")
                master = psutil.Process(self.nginx.proc.popen.pid)
                return {"nginx": [master, *master.children(recursive=True)]}
            if path in self.variants:
                return {"envoy": self.variants[path].processes()}
        except (OSError, ValueError, KeyError, psutil.Error):
            pass
        return {}

    def stop(self) -> None:
        for ve in self.variants.values():
            ve.stop()
        if self.gateway is not None:
            self.gateway.stop(30)
        self.nginx.stop()
        self.consul.stop()
        for e in self.engines:
            e.stop()


MEDIAN_KEYS = (
    "rps",
    "p50_ms",
    "p99_ms",
    "proxy_cpu_ms_per_req",
    "envoy_cpu_ms_per_req",
    "relay_cpu_ms_per_req",
    "nginx_cpu_ms_per_req",
    "events_per_req",
)


def summarize(per_path: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over rounds, then ratios against direct and nginx."""
    med: dict[str, dict[str, Any]] = {
        p: {k: statistics.median(x[k] for x in rows) for k in MEDIAN_KEYS if k in rows[0]}
        | {"errors": sum(x["errors"] for x in rows), "rounds": len(rows)}
        for p, rows in per_path.items()
    }
    direct, nginx = med["direct"], med["nginx"]
    for p, m in med.items():
        if p == "direct":
            continue
        m["added_p50_ms"] = m["p50_ms"] - direct["p50_ms"]
        m["added_p99_ms"] = m["p99_ms"] - direct["p99_ms"]
        m["throughput_ratio"] = m["rps"] / direct["rps"]
        m["rps_vs_nginx"] = m["rps"] / nginx["rps"]
        m["cpu_vs_nginx"] = m["proxy_cpu_ms_per_req"] / nginx["proxy_cpu_ms_per_req"]
        events = m.get("events_per_req", 0.0)
        if "relay_cpu_ms_per_req" in m and events:
            m["relay_cpu_us_per_event"] = m["relay_cpu_ms_per_req"] * 1000 / events
        if p not in REFERENCES and p != BARE and BARE in per_path:
            # paired by round (measured minutes apart at most): what the difference from the bare hop costs
            pairs = list(zip(per_path[p], per_path[BARE]))
            m["cpu_delta_vs_bare_ms"] = statistics.median(
                a["envoy_cpu_ms_per_req"] - b["envoy_cpu_ms_per_req"] for a, b in pairs
            )
            m["cpu_ratio_vs_bare"] = statistics.median(
                a["envoy_cpu_ms_per_req"] / b["envoy_cpu_ms_per_req"] for a, b in pairs
            )
    return med


def relay_costs(out: dict[str, Any]) -> dict[str, float]:
    """The relay's CPU per request and per event, and per event beyond the first (streaming minus
    non-streaming, spread over the extra events: what relaying one more chunk costs)."""
    res: dict[str, float] = {}
    for path in ("edge+relay", "edge+relay+limits"):
        plain, stream = out["non-streaming"].get(path), out["streaming"].get(path)
        if not plain or not stream:
            continue
        extra_events = stream["events_per_req"] - 1
        tag = "" if path == "edge+relay" else "limits_"
        res[f"{tag}cpu_ms_per_request"] = plain["relay_cpu_ms_per_req"]
        res[f"{tag}cpu_ms_per_stream"] = stream["relay_cpu_ms_per_req"]
        res[f"{tag}cpu_us_per_event"] = stream["relay_cpu_ms_per_req"] * 1000 / stream["events_per_req"]
        if extra_events > 0:
            res[f"{tag}cpu_us_per_extra_event"] = (
                (stream["relay_cpu_ms_per_req"] - plain["relay_cpu_ms_per_req"]) * 1000 / extra_events
            )
    if "limits_cpu_ms_per_request" in res:
        res["rate_limit_check_ms"] = res["limits_cpu_ms_per_request"] - res["cpu_ms_per_request"]
        res["rate_limit_check_stream_ms"] = res["limits_cpu_ms_per_stream"] - res["cpu_ms_per_stream"]
    return res


def run(
    concurrency: int = 16,
    seconds: float = 3.0,
    rounds: int = 5,
    workdir: Path | None = None,
    variants: Sequence[str] = DEFAULT_VARIANTS,
) -> dict[str, Any]:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ernie-bench-overhead-"))
    chosen = [v for v in VARIANTS if v.name in variants]
    rig = Rig(workdir, chosen)
    paths = [*REFERENCES, *GATEWAY_PATHS, *(v.name for v in chosen)]
    try:
        rig.start()
        out: dict[str, Any] = {
            "concurrency": concurrency,
            "seconds": seconds,
            "rounds": rounds,
            "engines": ENGINES,
            "max_tokens": MAX_TOKENS,
            "cpus": os.cpu_count(),
            "paths": paths,
            "variants": {v.name: v.what for v in chosen},
        }
        for mode in MODES:
            per_path: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
            for rnd in range(rounds):
                shift = rnd * max(1, len(paths) // rounds)
                for path in paths[shift % len(paths) :] + paths[: shift % len(paths)]:
                    rig.route(path)
                    r = asyncio.run(
                        measure(
                            rig.urls(path),
                            concurrency,
                            seconds,
                            mode == "streaming",
                            rig.cpu_groups(path),
                            rig.headers(path),
                        )
                    )
                    per_path[path].append(r)
                    cpu = f"proxy CPU {r['proxy_cpu_ms_per_req']:.3f} ms/req" if "proxy_cpu_ms_per_req" in r else ""
                    progress(
                        f"{mode} round {rnd + 1}/{rounds} {path:<26}: {r['rps']:6.1f} req/s  "
                        f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  {cpu}  errors {r['errors']}"
                    )
            out[mode] = summarize(per_path)
        out["relay"] = relay_costs(out)
        return out
    finally:
        rig.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description=__doc__.split("\n\n")[0],
        epilog="variants: " + "; ".join(f"{v.name!r}: {v.what}" for v in VARIANTS),
    )
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0, help="per path and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--variants",
        default="all",
        help='comma-separated variant names (see below), "all" (default) or "none" (bare is always measured)',
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    names = {v.name for v in VARIANTS}
    if args.variants == "all":
        chosen: tuple[str, ...] = DEFAULT_VARIANTS
    else:
        asked = [] if args.variants == "none" else [x.strip() for x in args.variants.split(",")]
        unknown = [x for x in asked if x not in names]
        if unknown:
            p.error(f"unknown variant(s): {', '.join(unknown)}")
        chosen = (BARE, *(x for x in asked if x != BARE))
    r = run(args.concurrency, args.seconds, args.rounds, variants=chosen)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    for mode in MODES:
        print(f"{mode} (concurrency {r['concurrency']}, medians of {r['rounds']} rounds):")
        for path in r["paths"]:
            m = r[mode][path]
            line = f"  {path:<26} {m['rps']:7.1f} req/s  p50 {m['p50_ms']:6.2f} ms  p99 {m['p99_ms']:6.2f} ms"
            if path != "direct":
                line += (
                    f"  proxy CPU {m['proxy_cpu_ms_per_req']:.3f} ms/req (x{m['cpu_vs_nginx']:.2f} nginx)"
                    f"  throughput x{m['throughput_ratio']:.2f} direct, x{m['rps_vs_nginx']:.2f} nginx"
                )
            if "relay_cpu_ms_per_req" in m:
                line += f"  relay CPU {m['relay_cpu_ms_per_req']:.3f} ms/req"
                if "relay_cpu_us_per_event" in m:
                    line += f", {m['relay_cpu_us_per_event']:.1f} us/event"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
