"""The naive baseline's health-check script, as teams write it before ernie-mesh.

Every --interval seconds (10 by default) it asks each engine's /health, one after the other; if the
set of engines answering 200 changed, it rewrites nginx's upstream file with those engines and runs
`nginx -s reload`. If no engine answers, it leaves the file alone (an empty upstream would make
nginx refuse the configuration). It knows nothing else: a hung engine that answers /health 200
stays in rotation; an engine that died and came back between two polls is never taken out.

    python -m bench.baseline.healthcheck --engine 127.0.0.1:8001 --engine 127.0.0.1:8002 \
        --upstream-file /etc/nginx/conf.d/upstream.conf --reload "nginx -s reload"

Only stdlib: it is meant to be copied to a host as is. `--events FILE` appends one JSON line per
reload (time, engines in rotation) so the drill can tell when nginx stopped routing to an engine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

UPSTREAM_NAME = "engines"
KEEPALIVE_CONNECTIONS = 32
_SERVER_RE = re.compile(r"^\s*server\s+(\S+?);", re.M)


def render_upstream(servers: list[str]) -> str:
    lines = [f"upstream {UPSTREAM_NAME} {{"]
    lines += [f"    server {s};" for s in servers]
    lines += [f"    keepalive {KEEPALIVE_CONNECTIONS};", "}"]
    return "\n".join(lines) + "\n"


def servers_in(path: str) -> list[str]:
    try:
        with open(path) as f:
            return _SERVER_RE.findall(f.read())
    except OSError:
        return []


def healthy(engine: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(f"http://{engine}/health", timeout=timeout_s) as r:
            status: int = r.status
            return status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} healthcheck: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", required=True, help="host:port of an engine (repeat)")
    p.add_argument("--upstream-file", required=True, help="nginx file holding `upstream engines {...}`")
    p.add_argument("--reload", default="nginx -s reload", help="command that reloads nginx")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls (default 10)")
    p.add_argument("--timeout", type=float, default=5.0, help="/health timeout, seconds (default 5)")
    p.add_argument("--events", help="append one JSON line per reload to this file")
    args = p.parse_args(argv)

    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    current = servers_in(args.upstream_file)
    log(f"watching {len(args.engine)} engine(s) every {args.interval:g}s; in rotation now: {current}")
    while not stop:
        up = [e for e in args.engine if healthy(e, args.timeout)]
        if up and up != current:
            write_atomically(args.upstream_file, render_upstream(up))
            res = subprocess.run(shlex.split(args.reload), capture_output=True, text=True)
            if res.returncode == 0:
                log(f"reloaded nginx: {up}")
                current = up
                if args.events:
                    with open(args.events, "a") as f:
                        f.write(json.dumps({"t": time.time(), "servers": up}) + "\n")
            else:
                log(f"nginx reload failed ({res.returncode}): {res.stderr.strip()}")
        elif not up:
            log("no engine answers /health: leaving nginx as it is")
        deadline = time.monotonic() + args.interval
        while not stop and time.monotonic() < deadline:
            time.sleep(max(0.0, min(0.2, deadline - time.monotonic())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
