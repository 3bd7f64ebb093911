"""`ernie-mesh drain <instance-id>`: ask the instance's engine agent to drain it, follow it in Consul."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx

from agent.catalog.base import CatalogEntry, CatalogError
from agent.catalog.consul import ConsulCatalog
from agent.config import ConfigError, check_consul_address
from agent.secret_files import read_secret

POLL_S = 0.25
TOKEN_FILE_ENV = "ERNIE_MESH_CONTROL_TOKEN_FILE"
DEFAULT_TOKEN_FILE = "/etc/ernie-mesh/control-token"  # where the Ansible role puts it


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh drain",
        description="Drain one instance: it turns 'draining' in Consul (gateways stop sending it new requests), "
        "requests in flight finish, then its engine agent stops the engine and deregisters it.",
    )
    p.add_argument("instance_id", help="instance ID as shown by `ernie-mesh status` (e.g. ernie-host1-10.0.0.7-8001)")
    p.add_argument(
        "--consul",
        default=os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500"),
        help="Consul HTTP address (default: $CONSUL_HTTP_ADDR or 127.0.0.1:8500)",
    )
    p.add_argument("--service", default="ernie", help="Consul service name (default ernie)")
    p.add_argument(
        "--token-file",
        default=os.environ.get(TOKEN_FILE_ENV, ""),
        help=f"file with the engine agent's control token (default: ${TOKEN_FILE_ENV}, else {DEFAULT_TOKEN_FILE} "
        "if it exists; `ernie-mesh up`: .run/control-token)",
    )
    p.add_argument("--no-wait", action="store_true", help="return once the drain started")
    p.add_argument("--timeout", type=float, default=900.0, help="give up waiting after this many seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object with the outcome")
    return p


def control_token(path: str) -> str:
    """The token to send; "" when none is configured (the agent then says what it needs)."""
    if not path and os.path.exists(DEFAULT_TOKEN_FILE):
        path = DEFAULT_TOKEN_FILE
    return read_secret(path, "--token-file") if path else ""


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check_consul_address(args.consul)  # a bad address: one line and exit 2 (agent.cli)
    try:
        token = control_token(args.token_file)
    except ConfigError as e:
        print(f"ernie-mesh drain: {e}", file=sys.stderr)
        return 2
    catalog = ConsulCatalog.from_env(args.consul)

    def find() -> CatalogEntry | None:
        _idx, entries = catalog.instances(args.service)
        return next((e for e in entries if e.instance_id == args.instance_id), None)

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    try:
        entry = find()
    except CatalogError as e:
        print(f"ernie-mesh drain: {e}", file=sys.stderr)
        return 1
    if entry is None:
        print(f"ernie-mesh drain: no instance {args.instance_id!r} in service {args.service!r}", file=sys.stderr)
        return 2
    agent_url = entry.meta.get("agent_url")
    if not agent_url:
        print(
            f"ernie-mesh drain: {args.instance_id} has no agent_url in its meta (not registered by an "
            "ernie-mesh engine agent)",
            file=sys.stderr,
        )
        return 2
    t0 = time.monotonic()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.post(f"{agent_url}/drain/{args.instance_id}", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        print(f"ernie-mesh drain: engine agent at {agent_url} did not accept the drain: {e}", file=sys.stderr)
        return 1
    if r.status_code >= 300:
        try:
            reason = str(r.json().get("error", r.text))
        except ValueError:
            reason = r.text[:200]
        print(
            f"ernie-mesh drain: engine agent at {agent_url} refused the drain (HTTP {r.status_code}): {reason}",
            file=sys.stderr,
        )
        return 2 if r.status_code in (401, 403) else 1
    say(f"draining {args.instance_id} (agent {agent_url})")
    outcome = {"instance": args.instance_id, "agent_url": agent_url, "drained": False, "seconds": None}
    if not args.no_wait:
        last = ""
        while time.monotonic() - t0 < args.timeout:
            try:
                entry = find()
            except CatalogError as e:
                line = f"  Consul unreachable ({e})"
            else:
                if entry is None:
                    outcome.update(drained=True, seconds=round(time.monotonic() - t0, 2))
                    break
                line = f"  {entry.verdict.note}"
            if line != last:
                say(line)
                last = line
            time.sleep(POLL_S)
        if outcome["drained"]:
            say(f"{args.instance_id} drained, stopped and deregistered in {outcome['seconds']}s")
        else:
            say(f"{args.instance_id} still registered after {args.timeout:g}s")
    if args.json:
        print(json.dumps(outcome))
    return 0 if outcome["drained"] or args.no_wait else 1
