"""`ernie-mesh keys add|list|revoke`: the API keys every gateway accepts (kept in Consul KV).

    ernie-mesh keys add alice --models ernie-4.5 --rpm 600 --tpm 200000   # prints the new key
    ernie-mesh keys list [--json]
    ernie-mesh keys revoke alice        # gateways refuse it within seconds

Gateways with `[edge] api_keys = "consul"` (the default) follow the change without a restart.
The key is printed once by `add`; `list` shows only a fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from agent.catalog.base import CatalogError
from agent.catalog.consul import ConsulCatalog
from agent.config import check_consul_address
from agent.gateway import keys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh keys",
        description=__doc__.split("\n\n")[0] + " Kept in Consul KV under " + keys.KV_PREFIX + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument(
        "--consul",
        default=os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500"),
        help="Consul HTTP address (default: $CONSUL_HTTP_ADDR or 127.0.0.1:8500; token: $CONSUL_HTTP_TOKEN)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="create a key (printed once)")
    add.add_argument("name", help="the key's name, in metrics and access logs")
    add.add_argument("--models", default="", help="comma-separated models it may use (default: all)")
    add.add_argument("--rpm", type=int, default=0, help="requests per minute (default: no limit)")
    add.add_argument("--tpm", type=int, default=0, help="tokens per minute, prompt + completion (default: no limit)")
    add.add_argument("--key", default="", help="use this key instead of a new random one")
    sub.add_parser("list", help="the keys (names, fingerprints, limits)")
    revoke = sub.add_parser("revoke", help="delete a key: gateways refuse it within seconds")
    revoke.add_argument("name")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check_consul_address(args.consul)
    store = ConsulCatalog.from_env(args.consul)
    try:
        if args.command == "add":
            return _add(store, args)
        if args.command == "list":
            return _list(store, args)
        return _revoke(store, args)
    except CatalogError as e:
        print(f"ernie-mesh keys: {e}", file=sys.stderr)
        return 1


def _add(store: ConsulCatalog, args: argparse.Namespace) -> int:
    try:
        key = keys.ApiKey(
            args.name,
            args.key or keys.new_key(),
            tuple(m for m in args.models.split(",") if m),
            args.rpm,
            args.tpm,
            keys.now_iso(),
        )
    except keys.BadKey as e:
        print(f"ernie-mesh keys: {e}", file=sys.stderr)
        return 2
    if not store.kv_put(keys.KV_PREFIX + key.name, key.to_json(), only_if_absent=True):
        print(
            f"ernie-mesh keys: a key named {key.name!r} exists (revoke it first, or pick another name)", file=sys.stderr
        )
        return 1
    if args.json:
        print(json.dumps({"name": key.name, "key": key.key, **key.policy()}))
    else:
        print(key.key)
        print(f"key {key.name!r} added: gateways accept it within seconds (shown once; keep it safe)", file=sys.stderr)
    return 0


def _list(store: ConsulCatalog, args: argparse.Namespace) -> int:
    _index, tree = store.kv_tree(keys.KV_PREFIX)
    found, errors = keys.from_kv(tree)
    rows = [{"name": k.name, "fingerprint": k.fingerprint, "created": k.created, **k.policy()} for k in found]
    if args.json:
        print(json.dumps({"keys": rows, "unreadable": errors}))
        return 0
    if not rows:
        print("no API keys (ernie-mesh keys add <name>)")
    for r in rows:
        limits = ", ".join(
            part
            for part in (
                f"{r['requests_per_minute']} req/min" if r["requests_per_minute"] else "",
                f"{r['tokens_per_minute']} tokens/min" if r["tokens_per_minute"] else "",
                f"models {','.join(r['models'])}" if r["models"] else "",
            )
            if part
        )
        print(f"{r['name']:<20} {r['fingerprint']:<24} {r['created']:<21} {limits or 'no limits'}")
    for line in errors:
        print(f"unreadable: {line}", file=sys.stderr)
    return 0


def _revoke(store: ConsulCatalog, args: argparse.Namespace) -> int:
    _index, tree = store.kv_tree(keys.KV_PREFIX + args.name)
    if keys.KV_PREFIX + args.name not in tree:
        print(f"ernie-mesh keys: no key named {args.name!r}", file=sys.stderr)
        return 1
    store.kv_delete(keys.KV_PREFIX + args.name)
    if args.json:
        print(json.dumps({"revoked": args.name}))
    else:
        print(f"key {args.name!r} revoked: gateways refuse it within seconds", file=sys.stderr)
    return 0
