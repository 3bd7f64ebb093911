"""The gateway agent's one typed config: gateway.toml -> environment -> CLI flags.

Every default lives here (GatewayConfig and PolicyConfig), the catalog watch's in its
WatchSettings (GatewayConfig takes them from there and builds the watch's settings in `watch`);
the Envoy bootstrap template only receives values from these objects.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.net import UNIX_PATH_MAX
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
from agent.gateway.relay.affinity import KEYS as AFFINITY_KEYS
from agent.gateway.watch import WatchSettings
from agent.naming import gateway_instance_id

_WATCH_DEFAULTS = WatchSettings()
REPO_ENVOY_DIR = Path(__file__).resolve().parents[2] / "envoy"
DEFAULT_BOOTSTRAP_TEMPLATE = REPO_ENVOY_DIR / "bootstrap.yaml"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class PolicyConfig:
    """Envoy data-plane policy knobs (docs/architecture.md §2.5, §5.2). Defaults chosen by measurement; see
    docs/gateway.md."""

    num_retries: int = 3
    host_selection_retry_max_attempts: int = 5
    retry_back_off_base_s: float = 0.025
    retry_back_off_max_s: float = 0.25
    retry_budget_percent: float = 25.0
    retry_min_concurrency: int = 10
    max_connections: int = 10000
    max_pending_requests: int = 10000
    max_requests: int = 10000
    connect_timeout_s: float = 1.0
    # uvicorn (vLLM, the simulated engine) closes idle keep-alive connections after 5 s: close ours first.
    upstream_idle_timeout_s: float = 3.0
    # A host that vanished (power loss, cut link) answers nothing, not even a reset: the kernel
    # gives up on its connections after this long (TCP keepalive + TCP_USER_TIMEOUT), and Envoy
    # retries the requests on them elsewhere if no response had started.
    upstream_dead_peer_timeout_s: float = 5.0
    # Passive ejection counts local-origin failures only (connect, reset, timeout): an engine's 5xx
    # may be caused by the request itself, and the engine agent's verdict decides its health.
    outlier_consecutive_local_origin_failure: int = 3
    outlier_interval_s: float = 1.0
    outlier_base_ejection_s: float = 5.0
    outlier_max_ejection_s: float = 60.0
    outlier_max_ejection_percent: int = 50
    # No route timeout (long generations), but a stream that sends nothing for this long is cut.
    # A non-streaming request sends nothing until it completes: keep this above the longest one.
    stream_idle_timeout_s: float = 120.0
    request_buffer_limit_bytes: int = 8 * 1024 * 1024
    # Bound the time to *receive* a request (a body trickled a byte a minute holds a slot, a
    # connection and retry buffer); the time to generate the answer stays unbounded.
    request_headers_timeout_s: float = 10.0
    request_receive_timeout_s: float = 60.0
    eds_initial_fetch_timeout_s: float = 5.0
    # Envoy's stats: "used" keeps those the dashboard, the alerts, the agent and the tests read
    # (docs/metrics.md; per-endpoint stats included); "all" keeps Envoy's whole tree (debugging).
    envoy_stats: str = "used"

    def __post_init__(self) -> None:
        check_positive(
            self,
            "host_selection_retry_max_attempts",
            "retry_back_off_base_s",
            "retry_back_off_max_s",
            "retry_budget_percent",
            "retry_min_concurrency",
            "max_connections",
            "max_pending_requests",
            "max_requests",
            "connect_timeout_s",
            "upstream_idle_timeout_s",
            "upstream_dead_peer_timeout_s",
            "outlier_consecutive_local_origin_failure",
            "outlier_interval_s",
            "outlier_base_ejection_s",
            "outlier_max_ejection_s",
            "stream_idle_timeout_s",
            "request_buffer_limit_bytes",
            "request_headers_timeout_s",
            "request_receive_timeout_s",
            "eds_initial_fetch_timeout_s",
        )
        if self.num_retries < 0:
            raise ConfigError(f"policy.num_retries must be >= 0, got {self.num_retries}")
        if not (0 < self.retry_budget_percent <= 100):
            raise ConfigError(f"policy.retry_budget_percent must be in (0, 100], got {self.retry_budget_percent}")
        if not (0 <= self.outlier_max_ejection_percent <= 100):
            raise ConfigError("policy.outlier_max_ejection_percent must be 0-100")
        if self.retry_back_off_max_s < self.retry_back_off_base_s:
            raise ConfigError("policy.retry_back_off_max_s must be >= retry_back_off_base_s")
        if self.envoy_stats not in ("used", "all"):
            raise ConfigError(f'policy.envoy_stats: "used" or "all", got {self.envoy_stats!r}')


@dataclass(frozen=True)
class RelaySettings:
    """The resuming relay (agent/gateway/relay): processes and resume policy. docs/gateway.md."""

    enabled: bool = True  # false: generation routes go straight to the engines (nothing resumes)
    processes: int = 2  # Envoy balances over them; one that dies is restarted, the other serves
    stall_s: float = 1.0  # a request on an instance that left the snapshot, silent this long, is rescued
    resume_limit: int = 3  # continuations per request
    resume_limit_after_crash: int = 1  # ... after the engine died or errored under it (a prompt of death)
    resume_wait_s: float = 10.0  # a continuation waits this long for a healthy instance
    drain_s: float = 30.0  # on stop: requests in flight get this long

    def __post_init__(self) -> None:
        if not (1 <= self.processes <= 16):
            raise ConfigError(f"relay.processes must be 1-16, got {self.processes}")
        check_positive(self, "stall_s")
        if min(self.resume_limit, self.resume_limit_after_crash, self.resume_wait_s, self.drain_s) < 0:
            raise ConfigError("relay.resume_limit, resume_limit_after_crash, resume_wait_s and drain_s must be >= 0")


ROUTING_MODES = ("affinity", "least-request")
_HEADER_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


@dataclass(frozen=True)
class RoutingSettings:
    """Where a new request goes (docs/gateway.md, Routing): "affinity" sends requests that share a
    prefix to the same instance (its prefix cache), bounded in load; "least-request" spreads them."""

    mode: str = "affinity"
    # The affinity key when the client names no session (agent/gateway/relay/affinity.py):
    # "system" (the system prompt; a chat without one: its start) or "conversation" (system
    # prompt + first user message).
    key: str = "system"
    session_header: str = "x-session-id"  # a client header naming its session (else the `user` field)
    # No instance takes more than this percentage of the mean in-flight load (of this gateway's
    # Envoy); above it, a key spills to the next instance in its order. 0: no bound.
    hash_balance_factor: int = 150
    prefix_chars: int = 4096  # how much of a prompt (or of a message) the key reads
    # Overload (agent/gateway/relay/admission.py): at most this many of this gateway's requests in
    # flight per routable instance (vLLM's default max_num_seqs; 0: no limit); beyond, requests wait
    # at the gateway, at most queue_size of them, each at most queue_timeout_s, then get 503 +
    # Retry-After.
    instance_concurrency: int = 256
    queue_size: int = 256
    queue_timeout_s: float = 30.0
    # Load awareness (agent/gateway/speed.py): every speed_poll_s the gateway reads the engine
    # agents' canary latencies; an instance much slower than the fleet's median gets less new work.
    speed_weights: bool = True
    speed_poll_s: float = 5.0

    def __post_init__(self) -> None:
        if self.speed_poll_s < 1:
            raise ConfigError(f"routing.speed_poll_s must be >= 1, got {self.speed_poll_s}")
        if min(self.instance_concurrency, self.queue_size) < 0 or self.queue_timeout_s <= 0:
            raise ConfigError("routing.instance_concurrency and queue_size must be >= 0, queue_timeout_s > 0")
        if self.mode not in ROUTING_MODES:
            raise ConfigError(f"routing.mode: one of {', '.join(ROUTING_MODES)}, got {self.mode!r}")
        if self.key not in AFFINITY_KEYS:
            raise ConfigError(f"routing.key: one of {', '.join(AFFINITY_KEYS)}, got {self.key!r}")
        if not _HEADER_RE.match(self.session_header):
            raise ConfigError(f"routing.session_header: a lower-case header name, got {self.session_header!r}")
        if self.hash_balance_factor != 0 and self.hash_balance_factor < 100:
            raise ConfigError(
                f"routing.hash_balance_factor: 0 (no bound) or a percentage >= 100, got {self.hash_balance_factor}"
            )
        if self.prefix_chars < 64:
            raise ConfigError(f"routing.prefix_chars must be >= 64, got {self.prefix_chars}")

    @property
    def affinity(self) -> bool:
        return self.mode == "affinity"


_DC_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_ZONE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class LocalitySettings:
    """Where the gateway is and which instances it prefers (docs/gateway.md, Datacenters and zones).

    Instances are Envoy localities with priorities: the gateway's own zone (engines' `zone` meta)
    `same_zone`, the rest of its datacenter `same_dc`, the datacenters in `datacenters` (watched
    through the local Consul agent, WAN federation) `other_dc` + their position in the list (so
    list them nearest first). Envoy sends a lower priority everything while it is healthy enough
    and spills the rest gradually as its healthy share falls below 100 / overprovisioning_factor."""

    zone: str = ""  # the gateway's own zone ("" : none; its datacenter's instances are all same_dc)
    datacenters: tuple[str, ...] = ()  # other Consul datacenters to fail over to, nearest first
    same_zone: int = 0
    same_dc: int = 1
    other_dc: int = 2
    # Envoy's overprovisioning factor (percent): a priority with 1/1.4 of its hosts healthy still
    # takes all the traffic; below, the rest spills to the next priority in proportion.
    overprovisioning_factor: int = 140
    # A remote datacenter that stops answering keeps its last known instances this long, then they
    # are dropped (Envoy's outlier detection covers the meantime). 0: dropped at the first failure.
    remote_keep_s: float = 60.0
    # The blocking wait of a remote datacenter's watch: a silent WAN is noticed within about this
    # plus the HTTP slack (a blocking query has no answer to give before).
    remote_watch_wait_s: float = 10.0

    def __post_init__(self) -> None:
        if self.zone and not _ZONE_RE.match(self.zone):
            raise ConfigError(f"locality.zone: letters, digits, '-', '_' or '.', got {self.zone!r}")
        for dc in self.datacenters:
            if not _DC_RE.match(dc):
                raise ConfigError(f"locality.datacenters: {dc!r} is not a Consul datacenter name")
        if len(set(self.datacenters)) != len(self.datacenters):
            raise ConfigError("locality.datacenters: a datacenter is listed twice")
        prios = (self.same_zone, self.same_dc, self.other_dc)
        if min(prios) < 0 or self.other_dc + len(self.datacenters) > 127:
            raise ConfigError("locality.same_zone, same_dc and other_dc must be 0-127 (Envoy priorities)")
        if not (self.same_zone <= self.same_dc <= self.other_dc):
            raise ConfigError(
                f"locality priorities must not prefer farther instances: same_zone ({self.same_zone}) <= "
                f"same_dc ({self.same_dc}) <= other_dc ({self.other_dc})"
            )
        if not (100 <= self.overprovisioning_factor <= 1000):
            raise ConfigError(
                f"locality.overprovisioning_factor: a percentage 100-1000, got {self.overprovisioning_factor}"
            )
        if self.remote_keep_s < 0:
            raise ConfigError(f"locality.remote_keep_s must be >= 0, got {self.remote_keep_s}")
        check_positive(self, "remote_watch_wait_s")

    def remote(self, local_dc: str) -> tuple[str, ...]:
        """The datacenters to watch besides the gateway's own (a shared config may list it too)."""
        return tuple(dc for dc in self.datacenters if dc != local_dc)

    def priority(self, zone: str, datacenter: str, local_dc: str) -> int:
        """The Envoy priority of an instance in `zone` of `datacenter` ("" or `local_dc`: the
        gateway's own), for a gateway in `local_dc`: other datacenters by their place in the list."""
        if not datacenter or datacenter == local_dc:
            return self.same_zone if self.zone and zone == self.zone else self.same_dc
        remote = self.remote(local_dc)
        return self.other_dc + (remote.index(datacenter) if datacenter in remote else len(remote))


# The OpenAI routes the edge serves; edge.extra_paths adds others vLLM has.
EDGE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_./-]{1,200}$")


@dataclass(frozen=True)
class EdgeSettings:
    """What the edge (Envoy's OpenAI listener) answers: the allow-list. docs/security.md."""

    # Other paths the engines serve to route too, exact: "/v1/embeddings", "/v1/responses", "/tokenize".
    extra_paths: tuple[str, ...] = ()
    # Where the API keys are kept: "consul" (KV ernie-mesh/api-keys/, `ernie-mesh keys`), the
    # path of a TOML file ([keys.<name>] key = "..."), or "off": no key needed (an explicit opt-out).
    api_keys: str = "consul"
    # TLS for clients: PEM certificate (chain) and private key; both or neither. Re-read on change.
    tls_cert: str = ""
    tls_key: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def keys_required(self) -> bool:
        return self.api_keys != "off"

    @property
    def api_keys_file(self) -> str:
        return self.api_keys if self.api_keys not in ("consul", "off") else ""

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("edge.tls_cert and edge.tls_key go together: set both (PEM files) or neither")
        for key in ("tls_cert", "tls_key"):
            path = getattr(self, key)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"edge.{key} {path}: not a readable file")
        if self.api_keys not in ("consul", "off") and not self.api_keys.startswith("/"):
            raise ConfigError(f'edge.api_keys: "consul", "off" or an absolute file path, got {self.api_keys!r}')
        for path in self.extra_paths:
            if not _PATH_RE.match(path) or "//" in path or "/../" in path or path.endswith("/.."):
                raise ConfigError(f"edge.extra_paths: {path!r} is not a plain absolute path like /v1/embeddings")
            if path == "/health":
                raise ConfigError("edge.extra_paths: /health is the gateway's own (load balancers' health check)")

    @property
    def paths(self) -> tuple[str, ...]:
        return EDGE_PATHS + tuple(p for p in self.extra_paths if p not in EDGE_PATHS)


@dataclass(frozen=True)
class GatewayConfig:
    consul: ConsulConfig = field(default_factory=ConsulConfig)
    name: str = ""  # default: short hostname; unique per gateway
    listen: str = "0.0.0.0:8080"  # Envoy: the OpenAI-compatible API
    envoy_admin: str = "127.0.0.1:9901"  # Envoy admin: loopback only
    xds: str = "127.0.0.1:18000"  # our ADS gRPC server (Envoy connects here)
    metrics: str = "127.0.0.1:9102"  # the agent's /metrics
    advertise_address: str = ""  # what the gateway registers in Consul (default: route to Consul)
    cluster: str = "ernie"  # Envoy cluster name for the engines
    # The catalog watch (top-level keys of gateway.toml; defaults from WatchSettings, read through `watch`)
    watch_wait_s: float = _WATCH_DEFAULTS.wait_s  # Consul blocking query wait
    settle_s: float = _WATCH_DEFAULTS.settle_s  # coalesce a burst of catalog changes
    watch_min_interval_s: float = _WATCH_DEFAULTS.min_interval_s  # rate limit between two catalog reads
    watch_backoff_initial_s: float = _WATCH_DEFAULTS.backoff_initial_s  # on Consul errors
    watch_backoff_max_s: float = _WATCH_DEFAULTS.backoff_max_s
    # After Consul comes back from an outage or with its state lost (a restarted -dev agent),
    # instances absent from the catalog keep their last state this long, while their engine
    # agents re-register (critical ones are removed at once).
    catalog_reset_grace_s: float = 15.0
    reconcile_interval_s: float = 1.0
    ttl_s: float = 10.0
    deregister_critical_after_s: float = 120.0
    envoy_restart_backoff_initial_s: float = 0.5
    envoy_restart_backoff_max_s: float = 30.0
    # On stop, and when a policy change hot-restarts Envoy: requests in flight get up to this long
    # (a stop ends sooner once none is left). Match systemd's TimeoutStopSec to it.
    drain_deadline_s: float = 300.0
    envoy_concurrency: int = 0  # Envoy worker threads; 0 = one per core
    envoy_log_level: str = "warning"
    run_dir: str = ""  # bootstrap, Envoy log, adoption state; default under $TMPDIR
    bootstrap_template: str = str(DEFAULT_BOOTSTRAP_TEMPLATE)
    # The engines' own API key (they run with vLLM's --api-key): the file the engine agents read
    # (its first line), injected by Envoy into every request to the engines; re-read on change.
    engine_api_key_file: str = ""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    relay: RelaySettings = field(default_factory=RelaySettings)
    edge: EdgeSettings = field(default_factory=EdgeSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    locality: LocalitySettings = field(default_factory=LocalitySettings)

    def __post_init__(self) -> None:
        for key in ("listen", "envoy_admin", "xds", "metrics"):
            check_host_port(getattr(self, key), key)
        admin_host, _ = check_host_port(self.envoy_admin, "envoy_admin")
        if not _is_loopback(admin_host):
            raise ConfigError(
                f"envoy_admin must be a loopback address (the admin API can stop Envoy), got {self.envoy_admin!r}"
            )
        xds_host, _ = check_host_port(self.xds, "xds")
        if not _is_loopback(xds_host):
            raise ConfigError(f"xds must be a loopback address (Envoy runs next to the agent), got {self.xds!r}")
        if self.name and not _NAME_RE.match(self.name):
            raise ConfigError(f"name must be letters, digits, '-' or '_' (max 63), got {self.name!r}")
        if not self.cluster.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"cluster must be letters, digits, '-' or '_', got {self.cluster!r}")
        check_positive(
            self,
            "watch_wait_s",
            "settle_s",
            "watch_backoff_initial_s",
            "watch_backoff_max_s",
            "reconcile_interval_s",
            "ttl_s",
            "envoy_restart_backoff_initial_s",
            "envoy_restart_backoff_max_s",
        )
        nonneg = (self.watch_min_interval_s, self.drain_deadline_s, self.envoy_concurrency, self.catalog_reset_grace_s)
        if min(nonneg) < 0:
            raise ConfigError(
                "watch_min_interval_s, drain_deadline_s, envoy_concurrency and catalog_reset_grace_s must be >= 0"
            )
        if self.engine_api_key_file and not self.engine_api_key_file.startswith("/"):
            raise ConfigError(f"engine_api_key_file must be an absolute path, got {self.engine_api_key_file!r}")
        if self.settle_s > 1.0:
            raise ConfigError(f"settle_s is a short window (<= 1 s) to coalesce bursts, got {self.settle_s}")
        if self.ttl_s < 3 * self.reconcile_interval_s:
            raise ConfigError(f"ttl_s ({self.ttl_s}) must be at least 3x reconcile_interval_s")
        if self.deregister_critical_after_s < 60:
            raise ConfigError("deregister_critical_after_s must be >= 60 (Consul reaps at most once a minute)")
        if self.routing.queue_timeout_s >= self.policy.stream_idle_timeout_s:
            raise ConfigError(
                f"routing.queue_timeout_s ({self.routing.queue_timeout_s:g}) must be below "
                f"policy.stream_idle_timeout_s ({self.policy.stream_idle_timeout_s:g}): Envoy would cut a "
                "queued request before the gateway answers it 503 + Retry-After"
            )
        if self.envoy_log_level not in ("trace", "debug", "info", "warning", "error", "critical", "off"):
            raise ConfigError(f"envoy_log_level: unknown level {self.envoy_log_level!r}")
        ports = [check_host_port(getattr(self, k), k)[1] for k in ("listen", "envoy_admin", "xds", "metrics")]
        if len(set(ports)) != len(ports):
            raise ConfigError("listen, envoy_admin, xds and metrics need four different ports")

    # --- derived values -------------------------------------------------------------------------

    def host_port(self, key: str) -> tuple[str, int]:
        return check_host_port(getattr(self, key), key)

    @property
    def watch(self) -> WatchSettings:
        """The catalog watch's settings, built from the watch_* keys here and nowhere else."""
        return WatchSettings(
            wait_s=self.watch_wait_s,
            settle_s=self.settle_s,
            min_interval_s=self.watch_min_interval_s,
            backoff_initial_s=self.watch_backoff_initial_s,
            backoff_max_s=self.watch_backoff_max_s,
        )

    @property
    def remote_watch(self) -> WatchSettings:
        """A remote datacenter's watch: a shorter blocking wait (a silent WAN is noticed sooner), no
        leader check (the local agent's leader says nothing about the remote servers)."""
        return replace(self.watch, wait_s=self.locality.remote_watch_wait_s, leader_check_s=0.0)

    @property
    def socket_dir(self) -> str:
        """Where the relay's and the engine hop's unix sockets live: run_dir, or, when run_dir is too
        long for a socket path (107 bytes), a short directory of this user's named after run_dir."""
        if len(str(Path(self.run_dir) / "engine-hop.sock").encode()) <= UNIX_PATH_MAX:
            return self.run_dir
        tag = hashlib.sha256(self.run_dir.encode()).hexdigest()[:12]
        return str(Path(tempfile.gettempdir()) / f"ernie-mesh-{os.getuid()}" / f"sock-{tag}")

    @property
    def hop_socket(self) -> str:
        """Envoy's engine hop: the relay's way to the engines (a unix socket only this user can open)."""
        return str(Path(self.socket_dir) / "engine-hop.sock")

    def relay_socket(self, index: int) -> str:
        return str(Path(self.socket_dir) / f"relay-{index}.sock")

    @property
    def relay_processes(self) -> int:
        return self.relay.processes if self.relay.enabled else 0

    @property
    def tls_dir(self) -> str:
        """The edge certificate as Envoy reads it (an SDS file the agent renders; 0700)."""
        return str(Path(self.run_dir) / "tls")

    @property
    def engine_credential_dir(self) -> str:
        """The engines' key as Envoy reads it (an SDS file the agent renders; 0700)."""
        return str(Path(self.run_dir) / "engine-credential")

    @property
    def keys_dir(self) -> str:
        """The API keys as Envoy and the relay read them (0700; rendered by the agent)."""
        return str(Path(self.run_dir) / "keys")

    @property
    def relay_metrics_dir(self) -> str:
        return str(Path(self.run_dir) / "relay-metrics")

    @property
    def instance_id(self) -> str:
        return gateway_instance_id(self.name)

    def public_url(self, key: str, scheme: str = "http") -> str:
        host, port = self.host_port(key)
        if host in ("0.0.0.0", "::", ""):
            host = self.advertise_address
        return f"{scheme}://{_bracket(host)}:{port}"

    @property
    def listen_url(self) -> str:
        return self.public_url("listen", "https" if self.edge.tls else "http")

    @property
    def metrics_url(self) -> str:
        return self.public_url("metrics") + "/metrics"

    @property
    def admin_url(self) -> str:
        host, port = self.host_port("envoy_admin")
        return f"http://{_bracket(host)}:{port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


HELP = """\
Gateway agent: watches the Consul catalog (service `ernie`), turns it into an immutable snapshot,
serves it over xDS (ADS gRPC) to the Envoy it starts and supervises. Envoy serves the
OpenAI-compatible API on `listen`; retries, outlier ejection, draining and JSON errors are Envoy
policy (envoy/bootstrap.yaml). The gateway registers itself in Consul as `ernie-gateway`.

Config file (TOML), every key optional:

  name = "gw1"                      # unique per gateway (default: hostname)
  listen = "0.0.0.0:8080"           # OpenAI API (Envoy)
  envoy_admin = "127.0.0.1:9901"    # Envoy admin, loopback only
  xds = "127.0.0.1:18000"           # ADS server (this agent), loopback only
  metrics = "127.0.0.1:9102"        # agent /metrics (Prometheus)
  run_dir = "/var/lib/ernie-mesh/gateway-gw1"
  engine_api_key_file = "/etc/ernie-mesh/engine-api-key"  # the engines' --api-key (0600), sent to them
  [consul]
  address = "127.0.0.1:8500"        # or CONSUL_HTTP_ADDR; token: CONSUL_HTTP_TOKEN
  # token_file = "/etc/ernie-mesh/gateway-consul-token"  # or CONSUL_HTTP_TOKEN_FILE (0600), re-read on change
  service = "ernie"
  [relay]                           # the resuming relay (docs/gateway.md)
  enabled = true
  processes = 2
  stall_s = 1.0                     # rescue a request silent this long on an instance that left
  resume_limit = 3                  # continuations per request (1 after an engine crash)
  [edge]
  extra_paths = ["/v1/embeddings"]  # served besides /v1/chat/completions, /v1/completions, /v1/models
  api_keys = "consul"               # or "/etc/ernie-mesh/api-keys.toml", or "off" (no key needed)
  tls_cert = "/etc/ernie-mesh/tls/edge.crt"   # TLS (and HTTP/2) for clients; re-read on change
  tls_key = "/etc/ernie-mesh/tls/edge.key"
  [routing]                         # where a request goes (docs/gateway.md, Routing)
  mode = "affinity"                 # or "least-request"
  key = "system"                    # or "conversation": what requests share an instance by
  session_header = "x-session-id"   # a client's session key (else the OpenAI `user` field)
  hash_balance_factor = 150         # percent of the mean load an instance may take (0: no bound)
  instance_concurrency = 256        # requests in flight per instance; beyond, they queue here
  queue_size = 256                  # ... at most this many, each at most queue_timeout_s (30), then 503
  [locality]                        # datacenters and zones (docs/gateway.md)
  zone = "a"                        # this gateway's zone: engines with zone meta "a" first
  datacenters = ["dc2"]             # other Consul datacenters (WAN-joined) to fail over to, nearest first
  remote_keep_s = 60                # a remote DC that stops answering keeps its instances this long
  [policy]
  num_retries = 3
  outlier_max_ejection_percent = 50
  stream_idle_timeout_s = 120

Precedence: file, then environment (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, ERNIE_MESH_GATEWAY_NAME,
ERNIE_MESH_ADVERTISE_ADDRESS), then flags. If the agent dies, Envoy keeps serving its last
endpoints; a restarted agent adopts the running Envoy (state in run_dir) and converges.

Signals: SIGTERM/SIGINT stop (drain Envoy up to drain_deadline_s = 300, then stop it); SIGHUP
reloads: the agent re-executes itself, re-reads this file and keeps Envoy serving — adopted, or
hot-restarted into the new policy without cutting a request.
"""


def parser() -> argparse.ArgumentParser:
    p = agent_parser(
        "ernie-mesh gateway",
        HELP,
        "gateway.toml",
        "Consul service of the engines (default ernie)",
        "address registered in Consul for this gateway",
    )
    p.add_argument("--name", help="gateway name, unique per gateway (default: hostname)")
    p.add_argument("--listen", help="OpenAI API host:port served by Envoy (default 0.0.0.0:8080)")
    p.add_argument("--envoy-admin", help="Envoy admin host:port, loopback only (default 127.0.0.1:9901)")
    p.add_argument("--xds", help="ADS gRPC host:port, loopback only (default 127.0.0.1:18000)")
    p.add_argument("--metrics", help="agent metrics host:port (default 127.0.0.1:9102)")
    p.add_argument("--run-dir", help="directory for the rendered bootstrap, Envoy log and state")
    p.add_argument("--envoy-log-level", help="Envoy log level (default warning)")
    p.add_argument("--envoy-concurrency", type=int, help="Envoy worker threads (default: one per core)")
    p.add_argument(
        "--api-keys", help='where API keys are kept: "consul" (default, `ernie-mesh keys`), a TOML file, or "off"'
    )
    return p


def load(argv: list[str]) -> GatewayConfig:
    """argv -> validated GatewayConfig; raises ConfigError (one line) on anything wrong."""
    args = parser().parse_args(argv)
    data = layered(
        args.config,
        {
            "name": os.environ.get("ERNIE_MESH_GATEWAY_NAME"),
            "advertise_address": os.environ.get("ERNIE_MESH_ADVERTISE_ADDRESS"),
        },
        {
            "consul": {"address": args.consul, "service": args.service},
            "name": args.name,
            "listen": args.listen,
            "envoy_admin": args.envoy_admin,
            "xds": args.xds,
            "metrics": args.metrics,
            "advertise_address": args.advertise_address,
            "run_dir": args.run_dir,
            "envoy_log_level": args.envoy_log_level,
            "envoy_concurrency": args.envoy_concurrency,
            "edge": {"api_keys": args.api_keys},
        },
    )
    return finish(build(GatewayConfig, data, where=""))


def finish(cfg: GatewayConfig) -> GatewayConfig:
    """Fill the defaults that depend on the machine (name, advertise address, run dir)."""
    name = cfg.name or short_hostname("gateway")
    name = re.sub(r"[^A-Za-z0-9_-]", "-", name)[:63]
    cfg = replace(cfg, name=name)
    if not cfg.advertise_address:
        listen_host, _ = cfg.host_port("listen")
        adv = listen_host if listen_host not in ("0.0.0.0", "::", "") else route_address(cfg.consul.address)
        cfg = replace(cfg, advertise_address=adv)
    if not cfg.run_dir:
        cfg = replace(cfg, run_dir=str(Path(tempfile.gettempdir()) / f"ernie-mesh-{os.getuid()}" / f"gateway-{name}"))
    if not Path(cfg.bootstrap_template).is_file():
        raise ConfigError(f"bootstrap_template {cfg.bootstrap_template} not found")
    return cfg
