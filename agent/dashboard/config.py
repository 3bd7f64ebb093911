"""The dashboard's one typed config (`ernie-mesh dashboard` flags, `ernie-mesh top` shares the sources).
A bad value is a ConfigError: one line and exit 2 (agent.cli)."""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from dataclasses import dataclass

from agent.config import ConfigError, check_consul_address, check_host_port

DEFAULT_PORT = 8090  # `ernie-mesh up` shifts it by --port-offset like every other port (agent/local/plan.py)
DEFAULT_PROMETHEUS = "http://127.0.0.1:9090"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
MIN_REFRESH_S = 0.5


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_prometheus_url(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"--prometheus: expected http(s)://host[:port][/path], got {url!r}")
    try:
        u.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        raise ConfigError(f"--prometheus: bad port in {url!r}") from None
    return url.rstrip("/")


@dataclass(frozen=True)
class DashboardConfig:
    prometheus: str = DEFAULT_PROMETHEUS
    consul: str | None = None  # host:port of a Consul agent (verdicts and reasons); None: Prometheus only
    service: str = "ernie"
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    refresh_s: float = 1.0  # how often the page reads the table (the charts: every 5 refreshes)
    minutes: float = 15.0  # the charts' time range
    step_s: float = 5.0  # the charts' resolution

    def __post_init__(self) -> None:
        object.__setattr__(self, "prometheus", check_prometheus_url(self.prometheus))
        if self.consul is not None:
            check_consul_address(self.consul)
        check_host_port(self.listen, "--listen")
        if self.refresh_s < MIN_REFRESH_S:
            raise ConfigError(f"--refresh must be >= {MIN_REFRESH_S}, got {self.refresh_s}")
        if not (1 <= self.minutes <= 24 * 60):
            raise ConfigError(f"--minutes must be 1-1440, got {self.minutes}")
        if not (1 <= self.step_s <= 3600) or self.minutes * 60 / self.step_s > 11000:
            raise ConfigError(f"--step must be 1-3600 s and give at most 11000 points, got {self.step_s}")

    @property
    def host_port(self) -> tuple[str, int]:
        return check_host_port(self.listen, "--listen")

    @property
    def on_loopback(self) -> bool:
        return is_loopback(self.host_port[0])


def env_consul() -> str | None:
    return os.environ.get("CONSUL_HTTP_ADDR") or None
