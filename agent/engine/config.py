"""The engine agent's one typed config: engine.toml -> environment -> CLI flags."""

from __future__ import annotations

import argparse
import functools
import hashlib
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.catalog.consul import split_address
from agent.config import (
    ConfigError,
    ConsulConfig,
    build,
    check_host_port,
    check_positive,
    agent_parser,
    layered,
    route_address,
    short_hostname,
)
from agent.engine.cpu import spread
from agent.naming import instance_id

ENGINE_KINDS = ("vllm", "simulated", "attach")
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
WILDCARDS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, `localhost` and `*.localhost` (RFC 6761), without a DNS lookup."""
    h = host.strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def url_host(url: str) -> str:
    """The host of `scheme://host[:port][/path]`, without IPv6 brackets."""
    hostport = url.split("://", 1)[-1].split("/", 1)[0]
    if hostport.startswith("["):
        return hostport[1:].split("]", 1)[0]
    return hostport.rpartition(":")[0] if ":" in hostport else hostport


@dataclass(frozen=True)
class EngineSpec:
    """One vLLM server: started and supervised by the agent (vllm, simulated) or attached (url)."""

    port: int = 0
    kind: str = "vllm"
    url: str = ""
    model: str = ""
    served_model_name: str = ""
    max_model_len: int = 0
    host: str = "127.0.0.1"
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    shutdown_timeout_s: float = 30.0
    log_file: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ConfigError(f"engine kind must be one of {', '.join(ENGINE_KINDS)}, got {self.kind!r}")
        if self.url and self.kind != "attach":
            object.__setattr__(self, "kind", "attach")
        if self.kind == "attach":
            if not self.url.startswith(("http://", "https://")):
                raise ConfigError(f'attached engine needs url = "http://host:port", got {self.url!r}')
            origin = "/".join(self.url.split("/", 3)[:3])  # scheme://host[:port], without the path
            try:
                _scheme, _host, port = split_address(origin, default_port=443 if origin.startswith("https") else 80)
            except ValueError as e:
                raise ConfigError(f"attached engine url {e}") from None
            if not self.port:
                object.__setattr__(self, "port", port)
        elif not self.model and self.kind == "vllm":
            raise ConfigError(f"engine on port {self.port}: `model` is required to start vLLM")
        if not (0 < self.port < 65536):
            raise ConfigError(f"engine port must be 1-65535, got {self.port}")
        if self.shutdown_timeout_s < 0:
            raise ConfigError("engine shutdown_timeout_s must be >= 0")

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/") if self.kind == "attach" else f"http://{self.host}:{self.port}"

    @property
    def supervised(self) -> bool:
        return self.kind != "attach"


@dataclass(frozen=True)
class EngineAgentConfig:
    consul: ConsulConfig = field(default_factory=ConsulConfig)
    node: str = ""
    advertise_address: str = ""
    listen: str = "127.0.0.1:9100"
    zone: str = "default"
    tags: tuple[str, ...] = ()
    probe_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    canary_interval_s: float = 1.0
    canary_timeout_s: float = 3.0
    canary_prompt: str = "Hi"
    stall_after_s: float = 8.0  # without process facts (attached engines): no token this long = stuck
    hang_after_s: float = 2.0  # an engine process stopped, or work in flight and no computing, this long = hung
    startup_timeout_s: float = 900.0
    # The TTL check: refreshed every ttl_refresh_s, expired (critical) after ttl_s without one. The
    # TTL bounds only what nothing else detects (an agent frozen while its engine runs): a dead
    # agent takes its engine down with it (refused connections: Envoy retries elsewhere, the relay
    # resumes), a dead host fails Consul's node check within seconds, and hung or dead engines are
    # the verdict's. So the margin is wide: a refresh may be 28 s late (a slow Consul, a starved
    # host; 10.7 s measured under heavy CPU load) before a healthy instance leaves the snapshot.
    ttl_s: float = 30.0
    ttl_refresh_s: float = 2.0
    deregister_critical_after_s: float = 1800.0
    drain_deadline_s: float = 300.0
    drain_quiet_s: float = 3.0  # drained = nothing in flight and no new request for this long
    restart_backoff_initial_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    crash_loop_restarts: int = 5
    crash_loop_window_s: float = 300.0
    log_dir: str = ""
    # The token POST /drain/<id> requires (Authorization: Bearer <token>), in a file (0600) re-read
    # at each request; unset: POST /drain is refused (SIGTERM still drains every instance).
    control_token_file: str = ""
    # The engines' own API key (vLLM --api-key), in a file (0600): one key a line, every line a key
    # the engines accept, the first the one the agent's probes and the gateways send (a rotation
    # lists the new key second, then first, then alone). Read when an engine starts.
    engine_api_key_file: str = ""
    engines: tuple[EngineSpec, ...] = ()

    def __post_init__(self) -> None:
        check_host_port(self.listen, "listen")
        check_positive(
            self,
            "probe_interval_s",
            "health_timeout_s",
            "canary_interval_s",
            "canary_timeout_s",
            "stall_after_s",
            "hang_after_s",
            "startup_timeout_s",
            "ttl_s",
            "ttl_refresh_s",
            "deregister_critical_after_s",
            "drain_deadline_s",
            "drain_quiet_s",
            "restart_backoff_initial_s",
            "restart_backoff_max_s",
            "crash_loop_restarts",
            "crash_loop_window_s",
        )
        if self.ttl_s < 3 * self.ttl_refresh_s:
            raise ConfigError(f"ttl_s ({self.ttl_s}) must be at least 3x ttl_refresh_s ({self.ttl_refresh_s})")
        if self.deregister_critical_after_s < 60:
            # Consul's minimum reap interval is one minute.
            raise ConfigError("deregister_critical_after_s must be >= 60 (Consul reaps at most once a minute)")
        if not self.engines:
            raise ConfigError("no [[engines]] configured: add at least one engine (see `ernie-mesh engine --help`)")
        ports = [(e.host if e.supervised else e.url, e.port) for e in self.engines]
        if len(set(ports)) != len(ports):
            raise ConfigError("two engines share the same port")
        for e in self.engines:
            if any(a == "--api-key" or a.startswith("--api-key=") for a in e.args) or "VLLM_API_KEY" in e.env:
                raise ConfigError(
                    f"engine on port {e.port}: give the engines' API key in engine_api_key_file, not in its args or "
                    "env (argv is readable by every user of the host, and the agent's probes must send it)"
                )

    @property
    def listens_beyond_loopback(self) -> bool:
        """The agent API is reachable from other hosts (a wildcard or a routable address)."""
        host, _port = self.listen_host_port
        return not is_loopback(host)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return check_host_port(self.listen, "listen")

    @property
    def agent_url(self) -> str:
        host, port = self.listen_host_port
        if host in ("0.0.0.0", "::", ""):
            host = self.advertise_address
        return f"http://{host}:{port}"

    def engine_address(self, engine: EngineSpec) -> str:
        """The address registered for `engine`, what gateways dial: its host (an attached engine: its
        URL's); listening everywhere, this host's advertise_address."""
        address = engine.host if engine.supervised else url_host(engine.url)
        return self.advertise_address if address in WILDCARDS else address

    def instance_id(self, engine: EngineSpec) -> str:
        return instance_id(self.consul.service, self.node, self.engine_address(engine), engine.port)

    @property
    def agent_id(self) -> str:
        """Who owns this agent's registrations (meta `agent_id`): the host and the agent's listen
        address. The same after a restart (it takes back what it registered before); another agent
        differs (on another host, or on this one: it cannot listen on the same address)."""
        return f"{host_identity()}/{self.listen}"


@functools.cache
def host_identity() -> str:
    """This host: its hostname and a digest of its machine-id (machine-id(5): kept confidential, so
    an application-specific hash of it), which tells apart hosts that share a name."""
    name = socket.gethostname() or "host"
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            machine = Path(path).read_text().strip()
        except OSError:
            continue
        if machine:
            return f"{name}/{hashlib.sha256(f'ernie-mesh:{machine}'.encode()).hexdigest()[:12]}"
    return name


def check_no_loopback(cfg: EngineAgentConfig, loopback_configured: bool) -> None:
    """Refuse to register a loopback address (gateways on other hosts would dial their own) unless
    advertise_address was set to one explicitly: a one-host mesh, as `ernie-mesh up` writes it."""
    if loopback_configured:
        return
    one_host = 'or advertise_address = "127.0.0.1" if every gateway runs on this host'
    for e in cfg.engines:
        address = cfg.engine_address(e)
        if not is_loopback(address):
            continue
        if not e.supervised and url_host(e.url) not in WILDCARDS:
            raise ConfigError(
                f"attached engine {e.url} is on {address}, a loopback address: gateways on other hosts would "
                f"dial their own; give its url with an address other hosts reach, {one_host}"
            )
        if e.supervised and e.host not in WILDCARDS:
            raise ConfigError(
                f"engine on port {e.port} listens on {address}, a loopback address: gateways on other hosts "
                f'would dial their own; set host = "<an address other hosts reach>" (or "0.0.0.0": registered '
                f"as advertise_address) in its [[engines]] table, {one_host}"
            )
        raise ConfigError(
            f"engine on port {e.port} would be registered at advertise_address {address} (derived from the "
            f"route to Consul at {cfg.consul.address}), a loopback address: gateways on other hosts would dial "
            "their own; set advertise_address (or --advertise-address, ERNIE_MESH_ADVERTISE_ADDRESS) to the "
            f"address other hosts reach this one on, {one_host}"
        )


HELP = """\
Engine agent: supervises local vLLM servers (or attaches to running ones), registers each in
Consul as service `ernie` with a TTL check carrying its health verdict, and drains on SIGTERM.

Config file (TOML), e.g.:

  listen = "127.0.0.1:9100"        # agent API: /live /ready/<id> /metrics /instances /drain/<id>
  control_token_file = "/etc/ernie-mesh/control-token"   # POST /drain needs it (0600; `ernie-mesh drain` sends it)
  engine_api_key_file = "/etc/ernie-mesh/engine-api-key" # vLLM --api-key (0600); the gateways send the same
  advertise_address = "10.0.0.7"   # other hosts reach this one there (default: the route to Consul)
  zone = "rack-1"
  [consul]
  address = "127.0.0.1:8500"       # or CONSUL_HTTP_ADDR; token: CONSUL_HTTP_TOKEN
  # token_file = "/etc/ernie-mesh/engine-consul-token"  # or CONSUL_HTTP_TOKEN_FILE (0600), re-read on change
  [[engines]]
  port = 8001
  host = "0.0.0.0"                 # vLLM listens everywhere, registered as advertise_address
  model = "baidu/ERNIE-4.5-0.3B-PT"
  served_model_name = "ernie"
  args = ["--max-model-len", "4096"]
  env = { CUDA_VISIBLE_DEVICES = "0" }
  [[engines]]
  url = "http://10.0.0.7:8002"     # attach to a server the agent did not start

Each engine is registered at the address gateways dial: its `host` (default 127.0.0.1) or an
attached engine's URL host; "0.0.0.0" or "::" means advertise_address. A loopback address is
refused (gateways on other hosts would dial their own) unless advertise_address is set to one
explicitly, for a mesh on one host (what `ernie-mesh up` writes).

The agent API listens on loopback unless `listen` says otherwise (a warning is logged then).
POST /drain/<id> needs `Authorization: Bearer <token>`, the first line of control_token_file;
without one configured it is refused (SIGTERM still drains every instance). With
engine_api_key_file the engines require that key (vLLM: VLLM_API_KEY, never argv) and every probe
and canary sends it; the gateways inject the same key (their engine_api_key_file).

Precedence: file, then environment (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, ERNIE_MESH_NODE,
ERNIE_MESH_ADVERTISE_ADDRESS, ERNIE_MESH_ZONE, ERNIE_MESH_CONTROL_TOKEN_FILE,
ERNIE_MESH_ENGINE_API_KEY_FILE), then flags.
"""


def parser() -> argparse.ArgumentParser:
    p = agent_parser(
        "ernie-mesh engine",
        HELP,
        "engine.toml",
        "Consul service name (default ernie)",
        "address other hosts reach the engines on",
    )
    p.add_argument("--node", help="node name used in instance IDs (default: hostname)")
    p.add_argument("--listen", help="agent API host:port (default 127.0.0.1:9100)")
    p.add_argument("--zone", help="zone meta/tag")
    p.add_argument("--log-dir", help="directory for engine logs (default: inherit stderr)")
    p.add_argument("--control-token-file", help="file (0600) with the token POST /drain/<id> requires")
    p.add_argument("--engine-api-key-file", help="file (0600) with the engines' API key (vLLM --api-key)")
    p.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="KIND:PORT[:MODEL]",
        help="add an engine without a file: vllm:8001:/path/model, simulated:8001, attach:http://h:8001",
    )
    return p


def _engine_from_flag(value: str) -> dict[str, str | int]:
    kind, _, rest = value.partition(":")
    if kind == "attach":
        return {"kind": "attach", "url": rest}
    port, _, model = rest.partition(":")
    if not port.isdigit():
        raise ConfigError(f"--engine {value!r}: expected KIND:PORT[:MODEL]")
    out: dict[str, str | int] = {"kind": kind, "port": int(port)}
    if model:
        out["model"] = model
    return out


def load(argv: list[str]) -> EngineAgentConfig:
    args = parser().parse_args(argv)
    data = layered(
        args.config,
        {
            "node": os.environ.get("ERNIE_MESH_NODE"),
            "advertise_address": os.environ.get("ERNIE_MESH_ADVERTISE_ADDRESS"),
            "zone": os.environ.get("ERNIE_MESH_ZONE"),
            "control_token_file": os.environ.get("ERNIE_MESH_CONTROL_TOKEN_FILE"),
            "engine_api_key_file": os.environ.get("ERNIE_MESH_ENGINE_API_KEY_FILE"),
        },
        {
            "consul": {"address": args.consul, "service": args.service},
            "node": args.node,
            "advertise_address": args.advertise_address,
            "listen": args.listen,
            "zone": args.zone,
            "log_dir": args.log_dir,
            "control_token_file": args.control_token_file,
            "engine_api_key_file": args.engine_api_key_file,
        },
    )
    if args.engine:
        data["engines"] = list(data.get("engines", [])) + [_engine_from_flag(v) for v in args.engine]
    engines = data.get("engines", [])
    if not isinstance(engines, list):
        raise ConfigError("engines must be an array of tables ([[engines]])")
    cfg: EngineAgentConfig = build(EngineAgentConfig, data, where="")
    loopback_configured = bool(cfg.advertise_address) and is_loopback(cfg.advertise_address)
    vllm = [e for e in cfg.engines if e.kind == "vllm"]
    bound = dict(zip((e.port for e in vllm), spread([dict(e.env) for e in vllm])))
    cfg = replace(
        cfg,
        node=cfg.node or short_hostname("node"),
        advertise_address=cfg.advertise_address or route_address(cfg.consul.address),
        engines=tuple(replace(e, env=bound[e.port]) if e.port in bound else e for e in cfg.engines),
    )
    check_no_loopback(cfg, loopback_configured)
    if cfg.log_dir:
        Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
    return cfg
