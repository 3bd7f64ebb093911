"""The binaries only the local mesh and the tests run (`consul agent -dev`); the product's own
(`envoy`) and the lookup rule are in agent/binaries.py."""

from __future__ import annotations

from agent.binaries import MissingBinary, find_binary

__all__ = ["MissingBinary", "consul_binary", "find_binary"]


def consul_binary() -> str:
    return find_binary(
        "consul",
        "run `scripts/install.sh core` (or `make test`) or install Consul from "
        "https://developer.hashicorp.com/consul/install",
    )
