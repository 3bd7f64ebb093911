"""`ernie-mesh engine`: build the config, the catalog and one controller per engine; run until
SIGTERM/SIGINT, then drain every instance and exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator

import httpx
import uvicorn

from agent.binaries import MissingBinary
from agent.catalog.base import Catalog, CatalogError
from agent.catalog.consul import ConsulCatalog
from agent.catalog.token_use import TokenUseCollector
from agent.catalog.keeper import foreign_owner, taken_message
from agent.config import ConfigError
from agent.engine import config as engine_config
from agent.engine.api import create_app
from agent.engine.instance import InstanceController
from agent.engine.metrics import EngineAgentMetrics
from agent.engine.resources import ResourceCollector
from agent.net import bind_error
from agent.secret_files import read_secret, read_secrets

log = logging.getLogger("agent.engine")

LAG_PERIOD_S = 0.5
LAG_WARN_S = 1.0  # a timer this late: every probe, canary and TTL refresh on the loop waited as long


class _AgentServer(uvicorn.Server):
    """uvicorn without its own signal handling: we own SIGTERM/SIGINT and drain first, the API staying
    up meanwhile. (Assigning `install_signal_handlers`, what uvicorn before 0.29 called, no longer
    kept uvicorn's handlers out: the API went down at the signal.)"""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def watch_loop_lag(metrics: EngineAgentMetrics) -> None:
    """Measure how late the event loop runs a timer, and say so in the log when it is late by
    seconds (a call blocking the loop, or a host starved of CPU): what delays a TTL refresh."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(LAG_PERIOD_S)
        lag = max(loop.time() - t0 - LAG_PERIOD_S, 0.0)
        metrics.loop_lag.observe(lag)
        if lag > LAG_WARN_S:
            log.warning("the agent's event loop ran %.1fs late (blocked, or the host is starved of CPU)", lag)


def check_runnable(cfg: engine_config.EngineAgentConfig) -> None:
    """Fail at start, with what to install, if an engine we must start cannot be started."""
    import importlib.util

    for spec in cfg.engines:
        if spec.kind == "vllm" and importlib.util.find_spec("vllm") is None:
            raise MissingBinary(
                f"vLLM is not installed in {sys.prefix}: run `scripts/install.sh core` "
                "(CPU build) or `pip install vllm` (GPU)"
            )
        if spec.kind == "vllm" and spec.model.startswith(("/", ".")):
            from pathlib import Path

            if not Path(spec.model).exists():
                raise ConfigError(f"engine on port {spec.port}: model directory {spec.model} does not exist")


async def serve(cfg: engine_config.EngineAgentConfig) -> int:
    catalog = ConsulCatalog.for_config(cfg.consul)
    metrics = EngineAgentMetrics()
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=8)
    async with httpx.AsyncClient(limits=limits) as client:
        controllers = {c.id: c for c in (InstanceController(cfg, s, catalog, client, metrics) for s in cfg.engines)}
        metrics.registry.register(
            TokenUseCollector(catalog, lambda: [c.publisher.keeper for c in controllers.values()])
        )
        metrics.registry.register(ResourceCollector(lambda: {i: c.process_sample for i, c in controllers.items()}))
        host, port = cfg.listen_host_port
        server = _AgentServer(
            uvicorn.Config(
                create_app(controllers, metrics, cfg.node, cfg.control_token_file),
                host=host,
                port=port,
                log_level="warning",
                lifespan="off",
            )
        )
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, shutdown.set)
        runs = [asyncio.create_task(c.run(), name=f"instance {c.id}") for c in controllers.values()]
        api = asyncio.create_task(server.serve(), name="agent api")
        lag = asyncio.create_task(watch_loop_lag(metrics), name="loop lag")
        log.info(
            "engine agent on %s: %d engine(s), Consul %s, node %s",
            cfg.agent_url,
            len(controllers),
            cfg.consul.address,
            cfg.node,
        )
        warn_exposure(cfg)
        await shutdown.wait()
        log.info("shutting down: draining %d instance(s)", len(controllers))
        await asyncio.gather(*(c.start_drain() for c in controllers.values()), return_exceptions=True)
        for c in controllers.values():
            c.stop()
        await asyncio.gather(*runs, return_exceptions=True)
        server.should_exit = True
        await api
        lag.cancel()
    return 0


def warn_exposure(cfg: engine_config.EngineAgentConfig) -> None:
    """Say so when the agent API is reachable from other hosts, or POST /drain is off."""
    if cfg.listens_beyond_loopback:
        where = "every interface" if cfg.listen_host_port[0] in engine_config.WILDCARDS else "a routable address"
        log.warning(
            "the agent API listens on %s (listen = %r): other hosts can read /instances and /metrics%s; "
            "listen on 127.0.0.1 unless they must reach it",
            where,
            cfg.listen,
            ", and POST /drain with the control token" if cfg.control_token_file else "",
        )
    if not cfg.control_token_file:
        log.info("POST /drain is off (no control_token_file); SIGTERM drains every instance")


def check_secrets(cfg: engine_config.EngineAgentConfig) -> None:
    """The secret files the agent reads exist, are private and not empty (one line and exit 2)."""
    if cfg.control_token_file:
        read_secret(cfg.control_token_file, "control_token_file")
    if cfg.engine_api_key_file:
        keys = read_secrets(cfg.engine_api_key_file, "engine_api_key_file")
        for spec in cfg.engines:
            if len(keys) > 1 and spec.kind == "vllm" and "--config" in spec.args:
                raise ConfigError(
                    f"engine on port {spec.port}: engine_api_key_file holds {len(keys)} keys, which vLLM takes "
                    "through --config only, and its args use --config already: give it one key during the rotation"
                )


def check_listen(cfg: engine_config.EngineAgentConfig) -> None:
    reason = bind_error(*cfg.listen_host_port)
    if reason:
        raise ConfigError(f"cannot listen on {cfg.listen}: {reason}")


def check_not_taken(cfg: engine_config.EngineAgentConfig, catalog: Catalog) -> None:
    """Refuse at start if another engine agent holds a live registration of one of our IDs (the
    registration path checks again: Consul may be unreachable now)."""
    try:
        _index, entries = catalog.instances(cfg.consul.service)
    except CatalogError:
        return
    for spec in cfg.engines:
        other = foreign_owner(entries, cfg.instance_id(spec), cfg.agent_id)
        if other is not None:
            raise ConfigError(taken_message(cfg.instance_id(spec), other))


def main(argv: list[str]) -> int:
    try:
        cfg = engine_config.load(argv)
        check_runnable(cfg)
        check_secrets(cfg)
        check_listen(cfg)
        check_not_taken(cfg, ConsulCatalog.for_config(cfg.consul))
    except (ConfigError, MissingBinary) as e:
        print(f"ernie-mesh engine: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(cfg))
