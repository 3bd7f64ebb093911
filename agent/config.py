"""Typed, validated configuration: file (TOML) -> environment -> CLI flags.

Every process builds exactly one config object at start; anything wrong is a ConfigError whose
message is one line, which the CLI prints before exiting with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import tomllib
import types
import typing
from pathlib import Path
from typing import Any
from collections.abc import Mapping


class ConfigError(Exception):
    """Bad configuration: the message is one line a human can act on."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a hint is a class, never an instance
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return build(tp, value, where)
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = value.split()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = []
        for i, v in enumerate(value):
            try:
                items.append(_coerce(v, item_tp, f"{where}[{i}]"))
            except ConfigError as e:
                raise ConfigError(f"{where}[{i}]: {e}" if not str(e).startswith(where) else str(e)) from None
        return tuple(items)
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return types.MappingProxyType({str(k): str(v) for k, v in value.items()})
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}: " if where else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}missing required key {missing[0]!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix}{e}") from None


def read_toml(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p}: invalid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"config file {p}: {e.strerror}") from None


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of nested tables; override wins; None values in override are ignored."""
    out = dict(base)
    for k, v in override.items():
        if v is None:
            continue
        if isinstance(v, Mapping):
            current = out.get(k)
            merged = merge(current if isinstance(current, Mapping) else {}, v)
            if merged or k in out:
                out[k] = merged
        else:
            out[k] = v
    return out


def layered(
    config_path: str | os.PathLike[str] | None, env: Mapping[str, Any], flags: Mapping[str, Any]
) -> dict[str, Any]:
    """One process's settings: config file, then CONSUL_HTTP_* and the process's own variables,
    then command-line flags (each layer wins over the previous; unset values are ignored)."""
    return merge(merge(merge(read_toml(config_path), consul_env()), env), flags)


def agent_parser(
    prog: str, description: str, config_file: str, service_help: str, advertise_help: str
) -> argparse.ArgumentParser:
    """The flags every agent has (config file, Consul, service, advertised address); each adds its own."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", "-c", help=config_file)
    p.add_argument("--consul", help="Consul HTTP address (default 127.0.0.1:8500, or CONSUL_HTTP_ADDR)")
    p.add_argument("--service", help=service_help)
    p.add_argument("--advertise-address", help=advertise_help)
    return p


def short_hostname(fallback: str) -> str:
    return socket.gethostname().split(".")[0] or fallback


def route_address(consul_address: str) -> str:
    """The local address this host uses to reach Consul: what other hosts can reach us on."""
    from agent.catalog.consul import split_address

    _scheme, host, port = split_address(consul_address)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            local_address: str = s.getsockname()[0]  # (host, port) for AF_INET
            return local_address
    except OSError:
        return "127.0.0.1"


def check_consul_address(address: str) -> None:
    """`host`, `host:port` or `http(s)://host[:port]` (what CONSUL_HTTP_ADDR accepts)."""
    from agent.catalog.consul import split_address

    try:
        split_address(address)
    except ValueError as e:
        raise ConfigError(f"consul.address {e}") from None


def consul_env() -> dict[str, Any]:
    """The standard Consul variables, as a [consul] table override (an empty one is unset, as for
    Consul's own CLI)."""
    return {
        "consul": {
            "address": os.environ.get("CONSUL_HTTP_ADDR") or None,
            "token": os.environ.get("CONSUL_HTTP_TOKEN") or None,
            "token_file": os.environ.get("CONSUL_HTTP_TOKEN_FILE") or None,
            "ca_file": os.environ.get("CONSUL_CACERT") or None,
        }
    }


def check_host_port(value: str, where: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise ConfigError(f"{where}: expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def check_positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v <= 0:
            raise ConfigError(f"{n} must be > 0, got {v}")


@dataclasses.dataclass(frozen=True)
class ConsulConfig:
    address: str = "127.0.0.1:8500"
    token: str = ""
    # The token's file (0600, first line; CONSUL_HTTP_TOKEN_FILE), re-read when it changes: a
    # rotated token is used without a restart. `token` (CONSUL_HTTP_TOKEN) wins, as with Consul's CLI.
    token_file: str = ""
    # CA bundle that verifies an https:// address (CONSUL_CACERT); "" = the system's.
    ca_file: str = ""
    service: str = "ernie"
    datacenter: str = ""

    def __post_init__(self) -> None:
        check_consul_address(self.address)
        if self.token_file and not self.token:
            from agent.secret_files import read_secret

            read_secret(self.token_file, "consul.token_file")  # unreadable, public or empty: exit 2
        if self.ca_file and not os.access(self.ca_file, os.R_OK):
            raise ConfigError(f"consul.ca_file {self.ca_file}: cannot read it")
        if not self.service or not self.service.replace("-", "").isalnum():
            raise ConfigError(f"consul.service must be a DNS label (letters, digits, '-'), got {self.service!r}")
