"""`ernie-mesh relay`: one relay process. Started and supervised by the gateway agent (never by
hand in production): it listens on a unix socket that Envoy's edge routes the generation routes
to, and sends every attempt to Envoy's engine hop (another unix socket), so that Envoy keeps
balancing, retries, ejection and keepalive. Several processes may run side by side (Envoy
balances over their sockets). SIGTERM: stop taking requests, let those in flight finish (up to
--drain-s), exit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.config import ConfigError, check_host_port
from agent.gateway.relay.affinity import KEYS as AFFINITY_KEYS
from agent.gateway.relay.admission import AdmissionPolicy
from agent.gateway.relay.affinity import AffinityRecipe
from agent.net import UNIX_PATH_MAX

if TYPE_CHECKING:  # aiohttp and the relay's modules are imported when it serves, not to parse flags
    from aiohttp.typedefs import Handler

    from agent.gateway.relay.membership import Member

log = logging.getLogger("agent.gateway.relay")

SWEEP_INTERVAL_S = 0.25


@dataclass(frozen=True)
class RelayConfig:
    socket: str  # where Envoy's edge reaches this relay
    hop_socket: str  # Envoy's engine hop
    xds: str  # the gateway agent's ADS server
    cluster: str  # the engines' Envoy cluster (EDS resource name)
    node_id: str
    stall_s: float = 1.0
    resume_limit: int = 3
    resume_limit_after_crash: int = 1
    resume_wait_s: float = 10.0
    max_body_bytes: int = 8 * 1024 * 1024
    drain_s: float = 30.0
    keys_dir: str = ""  # the key policies (rate limits, models) the gateway renders; "" = none
    affinity: AffinityRecipe | None = AffinityRecipe()  # None: no affinity key (least-request routing)
    admission: AdmissionPolicy = AdmissionPolicy()

    def __post_init__(self) -> None:
        for key in ("socket", "hop_socket"):
            if len(getattr(self, key)) > UNIX_PATH_MAX:
                raise ConfigError(
                    f"{key} path is longer than {UNIX_PATH_MAX} bytes (a unix socket limit): {getattr(self, key)}"
                )
        check_host_port(self.xds, "xds")
        if self.stall_s <= 0 or self.resume_wait_s < 0 or self.drain_s < 0:
            raise ConfigError("stall_s must be > 0, resume_wait_s and drain_s >= 0")
        if self.resume_limit < 0 or self.resume_limit_after_crash < 0:
            raise ConfigError("resume limits must be >= 0")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh relay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--socket", required=True, help="unix socket to listen on (Envoy's edge connects here)")
    p.add_argument("--hop-socket", required=True, help="unix socket of Envoy's engine hop")
    p.add_argument("--xds", required=True, help="host:port of the gateway agent's ADS server")
    p.add_argument("--cluster", default="ernie", help="Envoy cluster of the engines (default ernie)")
    p.add_argument("--node-id", default="", help="xDS node id (default: relay-<pid>)")
    p.add_argument(
        "--stall-s",
        type=float,
        default=RelayConfig.stall_s,
        help="a request on an instance that left the snapshot is rescued after this long "
        "without a chunk (default %(default)s)",
    )
    p.add_argument(
        "--resume-limit",
        type=int,
        default=RelayConfig.resume_limit,
        help="continuations per request (default %(default)s)",
    )
    p.add_argument(
        "--resume-limit-after-crash",
        type=int,
        default=RelayConfig.resume_limit_after_crash,
        help="continuations after the engine died or errored under the request (default %(default)s)",
    )
    p.add_argument(
        "--resume-wait-s",
        type=float,
        default=RelayConfig.resume_wait_s,
        help="how long a continuation waits for a healthy instance (default %(default)s)",
    )
    p.add_argument("--max-body-bytes", type=int, default=RelayConfig.max_body_bytes)
    p.add_argument(
        "--drain-s",
        type=float,
        default=RelayConfig.drain_s,
        help="on SIGTERM, requests in flight get this long (default %(default)s)",
    )
    p.add_argument("--keys-dir", default="", help="the gateway's rendered key policies (rate limits, models)")
    p.add_argument(
        "--affinity",
        choices=(*AFFINITY_KEYS, "off"),
        default=AffinityRecipe.key,
        help="the affinity key sent to Envoy's ring: the start of the conversation, the system prompt, "
        "or off (least-request routing) (default %(default)s)",
    )
    p.add_argument("--session-header", default=AffinityRecipe.session_header, help="a client's session header")
    p.add_argument("--prefix-chars", type=int, default=AffinityRecipe.prefix_chars, help="of a prompt the key reads")
    p.add_argument(
        "--instance-concurrency",
        type=int,
        default=AdmissionPolicy.instance_concurrency,
        help="requests in flight per routable instance before requests queue (0: no limit; default %(default)s)",
    )
    p.add_argument("--queue-size", type=int, default=AdmissionPolicy.queue_size, help="requests that may wait")
    p.add_argument("--queue-timeout-s", type=float, default=AdmissionPolicy.queue_timeout_s, help="longest wait")
    p.add_argument("--relay-processes", type=int, default=1, help="the gateway's relays (they share the limit)")
    return p


def load(argv: list[str]) -> RelayConfig:
    a = parser().parse_args(argv)
    return RelayConfig(
        socket=a.socket,
        hop_socket=a.hop_socket,
        xds=a.xds,
        cluster=a.cluster,
        node_id=a.node_id or f"relay-{os.getpid()}",
        stall_s=a.stall_s,
        resume_limit=a.resume_limit,
        resume_limit_after_crash=a.resume_limit_after_crash,
        resume_wait_s=a.resume_wait_s,
        max_body_bytes=a.max_body_bytes,
        drain_s=a.drain_s,
        keys_dir=a.keys_dir,
        affinity=None
        if a.affinity == "off"
        else AffinityRecipe(key=a.affinity, session_header=a.session_header.lower(), prefix_chars=a.prefix_chars),
        admission=AdmissionPolicy(a.instance_concurrency, a.queue_size, a.queue_timeout_s, a.relay_processes),
    )


async def serve(cfg: RelayConfig) -> int:
    import aiohttp
    from aiohttp import web

    from agent.gateway.relay import ads_client
    from agent.gateway.relay.admission import Admission
    from agent.gateway.relay.handler import Relay, ResumePolicy, add_extra_headers
    from agent.gateway.relay.limits import KeyLimits
    from agent.gateway.relay.membership import Membership
    from agent.gateway.relay.metrics import RelayMetrics
    from agent.gateway.relay.request import MODELS_PATH, ROUTES
    from agent.gateway.relay.transcript import error_body

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    membership = Membership(cfg.stall_s)
    metrics = RelayMetrics()

    def on_members(members: list[Member], version: str) -> None:
        rescued = membership.update(members, version)
        relay.admission.wake()  # more instances: more requests may go
        if rescued:
            log.warning(
                "snapshot %s: rescuing %d stalled request(s) from instance(s) no longer routable",
                version[:8],
                len(rescued),
            )

    async def sweep() -> None:
        while not stop.is_set():
            if membership.sweep():
                log.warning("rescued stalled request(s) from instance(s) no longer routable")
            try:
                await asyncio.wait_for(stop.wait(), SWEEP_INTERVAL_S)
            except TimeoutError:
                pass

    session = aiohttp.ClientSession(
        base_url="http://engine-hop",
        connector=aiohttp.UnixConnector(path=cfg.hop_socket, limit=0, keepalive_timeout=30),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0),
        auto_decompress=False,
    )
    relay = Relay(
        session,
        membership,
        metrics,
        ResumePolicy(cfg.resume_limit, cfg.resume_limit_after_crash, cfg.resume_wait_s),
        limits=KeyLimits(cfg.keys_dir) if cfg.keys_dir else None,
        affinity=cfg.affinity,
        admission=Admission(cfg.admission, membership.routable),
    )

    @web.middleware
    async def too_large(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return web.Response(
                status=413,
                content_type="application/json",
                body=error_body(f"request body over {cfg.max_body_bytes} bytes", 413, "invalid_request_error"),
            )

    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[too_large])
    app.on_response_prepare.append(add_extra_headers)
    for path in ROUTES:
        app.router.add_route("*", path, relay.handle)
    app.router.add_route("*", MODELS_PATH, relay.models)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    Path(cfg.socket).unlink(missing_ok=True)
    site = web.UnixSite(runner, cfg.socket)
    await site.start()
    os.chmod(cfg.socket, 0o600)
    tasks = [
        asyncio.create_task(
            ads_client.follow(cfg.xds, cfg.cluster, cfg.node_id, on_members, stop, on_models=membership.update_models)
        ),
        asyncio.create_task(sweep()),
    ]
    log.info(
        "relay %s: listening on %s, engine hop %s, snapshot from %s", cfg.node_id, cfg.socket, cfg.hop_socket, cfg.xds
    )
    await stop.wait()
    log.info("relay %s: stopping (requests in flight get up to %.0fs)", cfg.node_id, cfg.drain_s)
    await site.stop()
    try:
        await asyncio.wait_for(_idle(metrics_of=relay), cfg.drain_s)
    except TimeoutError:
        log.warning("relay %s: drain deadline reached", cfg.node_id)
    await runner.cleanup()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await session.close()
    Path(cfg.socket).unlink(missing_ok=True)
    return 0


class _InFlight(Protocol):
    active: int  # requests in flight


async def _idle(metrics_of: _InFlight) -> None:
    while metrics_of.active:
        await asyncio.sleep(0.05)


def main(argv: list[str]) -> int:
    try:
        cfg = load(argv)
    except ConfigError as e:
        print(f"ernie-mesh relay: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(cfg))  # the standard event loop works too, a little slower
    return uvloop.run(serve(cfg))
