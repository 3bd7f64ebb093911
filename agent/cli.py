"""`ernie-mesh` command line: a thin dispatcher; each command lives in its own module with its own
argparse parser (`main(argv) -> int`)."""

from __future__ import annotations

import importlib
import logging
import os
import sys

from agent import __version__
from agent.config import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("agent.local.up", "bring the whole mesh up on this machine (Consul, vLLM engines, gateway, UI)"),
    "down": ("agent.local.down", "drain and stop a mesh started by `up`"),
    "add": ("agent.local.add", "add one engine (agent + engine) to the running local mesh"),
    "remove": ("agent.local.remove", "drain and stop engines of the running local mesh"),
    "scale": ("agent.local.scale", "add or remove engines of the local mesh until N pass"),
    "status": ("agent.status", "instances and gateways as Consul sees them (--json)"),
    "top": ("agent.dashboard.top", "live table of the mesh in a terminal, from Prometheus and Consul (--once, --json)"),
    "dashboard": ("agent.dashboard.server", "live dashboard page of a mesh, from Prometheus and Consul"),
    "engine": ("agent.engine.cli", "engine agent: supervise vLLM, register in Consul, report health"),
    "drain": ("agent.engine.drain_cli", "drain one instance through its engine agent"),
    "gateway": ("agent.gateway.cli", "gateway agent: Consul catalog -> Envoy over xDS"),
    "keys": ("agent.gateway.keys_cli", "API keys the gateways accept: add, list, revoke"),
    "relay": ("agent.gateway.relay.server", "resuming relay process of the gateway (started by the gateway agent)"),
    "sim-engine": ("agent.sim.cli", "SIMULATED OpenAI-compatible engine with fault modes (tests, drills)"),
    "drill": ("bench.drill", "failure drills under load, side by side with the nginx baseline"),
}

USAGE = "usage: ernie-mesh <command> [options]   (ernie-mesh <command> --help for details)\n\ncommands:\n" + "\n".join(
    f"  {name:<11} {help_}" for name, (_mod, help_) in COMMANDS.items()
)


def setup_logging() -> None:
    level = os.environ.get("ERNIE_MESH_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"ernie-mesh {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ernie-mesh: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    setup_logging()
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except ConfigError as e:
        print(f"ernie-mesh {name}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
