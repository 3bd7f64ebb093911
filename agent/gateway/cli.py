"""`ernie-mesh gateway`: build the config and the parts, run until a signal.

SIGTERM/SIGINT stop the gateway: deregister, drain Envoy (requests in flight get up to
`drain_deadline_s`), stop Envoy and the relays. SIGHUP reloads: the agent re-executes itself
(new code, config re-read) and leaves Envoy and the relays serving; the new agent adopts them, or
hot-restarts Envoy when the rendered bootstrap changed (systemd: `systemctl reload`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from agent.binaries import MissingBinary, envoy_binary
from agent.catalog.base import CatalogError
from agent.catalog.consul import ConsulCatalog
from agent.catalog.token_use import TokenUseCollector
from agent.config import ConfigError
from agent.gateway import bootstrap
from agent.gateway import config as gateway_config
from agent.gateway.agent import GatewayAgent
from agent.gateway.edge_tls import EdgeCertificate
from agent.gateway.engine_credential import EngineCredential
from agent.gateway.envoy import EnvoySupervisor
from agent.gateway.keys_watch import KeysWatch
from agent.gateway.metrics import GatewayMetrics
from agent.gateway.relays import RelaySupervisor
from agent.gateway.watch import CatalogWatch
from agent.gateway.xds import AdsServer
from agent.net import bind_error

log = logging.getLogger("agent.gateway")


def check_bindable(cfg: gateway_config.GatewayConfig, *keys: str) -> None:
    """The agent's own ports (xDS, metrics) must be free: fail at start, not in a thread."""
    for key in keys:
        reason = bind_error(*cfg.host_port(key))
        if reason:
            raise ConfigError(f"cannot listen on {key} {getattr(cfg, key)}: {reason}")


def prepare(argv: list[str]) -> tuple[gateway_config.GatewayConfig, str, str]:
    cfg = gateway_config.load(argv)
    binary = envoy_binary()
    try:
        template = Path(cfg.bootstrap_template).read_text()
    except OSError as e:
        raise ConfigError(f"bootstrap_template {cfg.bootstrap_template}: {e.strerror}") from None
    try:
        bootstrap.render(template, cfg)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"bootstrap_template {cfg.bootstrap_template}: bad or unknown placeholder {e}") from None
    check_bindable(cfg, "xds", "metrics")
    if cfg.engine_api_key_file:  # unreadable, public or empty: exit 2; rendered before Envoy starts
        EngineCredential(cfg.engine_api_key_file, cfg.engine_credential_dir).prepare()
    if cfg.edge.tls:
        EdgeCertificate(cfg.edge.tls_cert, cfg.edge.tls_key, cfg.tls_dir).prepare()  # a bad pair: exit 2
    return cfg, binary, template


def _local_datacenter(cfg: gateway_config.GatewayConfig, catalog: ConsulCatalog) -> str:
    """The gateway's own datacenter: consul.datacenter, else the local agent's (asked once; if
    Consul does not answer yet, the local watch's first entries tell)."""
    if cfg.consul.datacenter:
        return cfg.consul.datacenter
    try:
        return catalog.local_datacenter()
    except CatalogError as e:
        if cfg.locality.datacenters:
            log.warning("cannot ask Consul for its datacenter (%s): watching every one listed", e)
        return ""


def serve(cfg: gateway_config.GatewayConfig, binary: str, template: str) -> int:
    """Run until a signal. Returns the exit code, or RELOAD after SIGHUP (everything but Envoy
    and the relays stopped, ready for the exec)."""
    catalog = ConsulCatalog.for_config(cfg.consul)
    metrics = GatewayMetrics()
    wake = threading.Event()  # a supervised process exited: the agent's loop runs at once
    envoy = EnvoySupervisor(cfg, binary, template, on_restart=metrics.envoy_restarts.inc, on_exit=wake.set)
    # Wiring runs one way: metrics <- ADS server <- agent <- watch; nothing points back.
    # Each model's cluster is a copy of the engine cluster of the rendered bootstrap (policy written once).
    ads = AdsServer(
        cfg.xds,
        callbacks=metrics,
        overprovisioning_factor=cfg.locality.overprovisioning_factor,
        cluster_template=bootstrap.cluster_template(envoy.bootstrap_text, cfg.cluster),
    )
    relays = RelaySupervisor(cfg, on_restart=metrics.relay_restarts.inc, on_exit=wake.set)
    keys_watch = (
        KeysWatch(
            Path(cfg.keys_dir),
            store=None if cfg.edge.api_keys_file else catalog,
            file=cfg.edge.api_keys_file,
            on_load=metrics.api_keys.set,
        )
        if cfg.edge.keys_required
        else None
    )
    agent = GatewayAgent(cfg, catalog, metrics, ads, envoy, relays, wake=wake)
    metrics.registry.register(TokenUseCollector(catalog, lambda: [agent.keeper]))
    watch = CatalogWatch(catalog, cfg.consul.service, agent.on_watch, cfg.watch, metrics=metrics)
    agent.local_dc = _local_datacenter(cfg, catalog)
    remote_watches = [
        CatalogWatch(
            ConsulCatalog.for_config(cfg.consul, datacenter=dc),
            cfg.consul.service,
            agent.remote_watcher(dc),
            cfg.remote_watch,
        )
        for dc in cfg.locality.remote(agent.local_dc)
    ]

    reload = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal reload
        reload = signum == signal.SIGHUP
        log.info("%s: %s", signal.Signals(signum).name, "reloading (envoy keeps serving)" if reload else "stopping")
        agent.stop_event.set()
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    host, port = cfg.host_port("metrics")
    metrics_server, _thread = metrics.serve(host, port)
    ads.start()
    watch.start()  # publishes the first snapshot as soon as Consul answers
    for w in remote_watches:
        w.start()
    engine_key = (
        EngineCredential(cfg.engine_api_key_file, cfg.engine_credential_dir).start()
        if cfg.engine_api_key_file
        else None
    )
    edge_cert = EdgeCertificate(cfg.edge.tls_cert, cfg.edge.tls_key, cfg.tls_dir) if cfg.edge.tls else None
    if edge_cert is not None:
        edge_cert.start()
    if keys_watch is not None:
        keys_watch.prepare()  # the key file Envoy reads must exist when it starts
        keys_watch.start()
    else:
        log.warning("edge.api_keys = off: the OpenAI API on %s answers without a key", cfg.listen)
    relays_how = relays.adopt_or_start()
    metrics.include_relays(cfg.relay_metrics_dir)
    how = envoy.adopt_or_start()
    log.info(
        "gateway %s: OpenAI API %s (envoy %s, relays %s), admin %s, xDS %s, metrics %s, Consul %s service %r",
        cfg.name,
        cfg.listen_url,
        how,
        relays_how,
        cfg.admin_url,
        cfg.xds,
        cfg.metrics_url,
        cfg.consul.address,
        cfg.consul.service,
    )
    try:
        agent.run()
    finally:
        agent.stop_background()
        if not reload:
            log.info("shutting down: deregistering, draining envoy (up to %.0fs)", cfg.drain_deadline_s)
            agent.deregister()
            envoy.stop()
            relays.stop()
        for w in (watch, *remote_watches):
            w.stop(timeout_s=0.2)  # a daemon thread, maybe inside a blocking query
        if keys_watch is not None:
            keys_watch.stop()
        if edge_cert is not None:
            edge_cert.stop()
        if engine_key is not None:
            engine_key.stop()
        ads.stop()
        metrics_server.shutdown()
        metrics_server.server_close()
        log.info("gateway %s %s", cfg.name, "re-executing" if reload else "stopped")
    return RELOAD if reload else 0


RELOAD = -1


def reexec() -> None:
    """Replace this process with a fresh agent: same command line, same pid (systemd's MainPID;
    Envoy and the relays stay its children). Its sockets are closed on exec (Python's default)."""
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def main(argv: list[str]) -> int:
    try:
        cfg, binary, template = prepare(argv)
    except (ConfigError, MissingBinary) as e:
        print(f"ernie-mesh gateway: {e}", file=sys.stderr)
        return 2
    code = serve(cfg, binary, template)
    if code == RELOAD:
        reexec()
    return code
