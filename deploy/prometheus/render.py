#!/usr/bin/env python3
"""Render the mesh's Prometheus config and rules for a given Consul (or re-render the defaults here).

  python deploy/prometheus/render.py                         # rewrite deploy/prometheus/* (defaults)
  python deploy/prometheus/render.py --consul 10.0.0.5:8500 --out /etc/prometheus \
      [--scrape-interval 15] [--service ernie] [--token-env CONSUL_HTTP_TOKEN]

The files are generated from agent/local/prometheus.py and agent/local/prometheus_rules.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from agent.local import prometheus  # noqa: E402
from agent.local.prometheus_rules import render_rules  # noqa: E402


def render_defaults(directory: Path = HERE) -> dict[Path, str]:
    """The checked-in files: default Consul address, rule file path relative to the config."""
    return {
        directory / prometheus.CONFIG_FILE_NAME: prometheus.render_config(),
        directory / prometheus.RULES_DIR_NAME / prometheus.RULES_FILE_NAME: render_rules(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--consul", help="Consul HTTP address host:port (default: re-render the checked-in defaults)")
    p.add_argument("--out", help="directory to write prometheus.yml and rules/ into (with --consul)")
    p.add_argument("--scrape-interval", type=float, default=prometheus.SCRAPE_INTERVAL_S, help="seconds")
    p.add_argument("--service", default=prometheus.ENGINE_SERVICE, help="Consul service of the engines")
    p.add_argument("--gateway-service", default=prometheus.GATEWAY_SERVICE)
    p.add_argument("--token-env", help="name of an environment variable holding a Consul ACL token")
    args = p.parse_args(argv)
    if not args.consul:
        for path, text in render_defaults().items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
        return 0
    if not args.out:
        p.error("--out DIR is required with --consul")
    token = os.environ.get(args.token_env) if args.token_env else None
    path = prometheus.write_config(
        args.out,
        args.consul,
        scrape_interval_s=args.scrape_interval,
        engine_service=args.service,
        gateway_service=args.gateway_service,
        consul_token=token,
    )
    print(f"wrote {path} and its rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
