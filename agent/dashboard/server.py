"""`ernie-mesh dashboard`: live graphs of a mesh where Grafana cannot be installed.

A small FastAPI server reads Prometheus' HTTP API (any Prometheus that scrapes the mesh:
`--prometheus URL`) and, with `--consul`, the verdicts and reasons in Consul; the page
(static/index.html) draws its charts with uPlot, vendored from the npm registry by
scripts/install.sh into static/vendor/uplot/. Read-only, no secret on it; it listens on loopback
by default (docs/security.md), and then answers only requests whose Host is a loopback name (a
DNS-rebinding page gets a 403).

  GET /                 the page
  GET /api/snapshot     per instance verdict, reason and figures; gateways; Consul; Prometheus
  GET /api/charts       every chart's series over the last --minutes, on one time grid
  GET /api/config       what the page needs to know (sources, refresh)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from agent.config import ConfigError
from agent.dashboard.config import DEFAULT_PORT, DEFAULT_PROMETHEUS, DashboardConfig, env_consul, is_loopback
from agent.dashboard.incidents import VerdictWatch
from agent.dashboard.prom import Prometheus
from agent.dashboard.snapshot import Sources, charts, snapshot

log = logging.getLogger("agent.dashboard")

STATIC_DIR = Path(__file__).resolve().parent / "static"
VENDOR_DIR = STATIC_DIR / "vendor" / "uplot"
VENDOR_FILES = ("uPlot.iife.min.js", "uPlot.min.css")


def missing_vendor_files() -> list[str]:
    return [f for f in VENDOR_FILES if not (VENDOR_DIR / f).is_file()]


def check_vendored() -> None:
    missing = missing_vendor_files()
    if missing:
        raise ConfigError(
            f"the charting library is not installed ({VENDOR_DIR}/{missing[0]} missing): "
            "run `scripts/install.sh core` (it fetches uPlot from the npm registry)"
        )


def _host_allowed(host_header: str) -> bool:
    name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    return is_loopback(name)


def create_app(cfg: DashboardConfig, prom: Prometheus | None = None) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    prom = prom or Prometheus(cfg.prometheus)
    watch = VerdictWatch(cfg.consul, cfg.service).start() if cfg.consul else None
    sources = Sources(prom, cfg.consul, cfg.service, watch)
    app = FastAPI(title="ernie-mesh dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    if cfg.on_loopback:

        @app.middleware("http")
        async def loopback_host_only(request: Request, call_next: Any) -> Response:
            if not _host_allowed(request.headers.get("host", "")):
                return JSONResponse({"error": "this dashboard answers loopback names only"}, status_code=403)
            response: Response = await call_next(request)
            return response

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/config")
    def config() -> dict[str, Any]:
        return {
            "prometheus": cfg.prometheus,
            "consul": cfg.consul,
            "service": cfg.service,
            "refresh_s": cfg.refresh_s,
            "minutes": cfg.minutes,
            "step_s": cfg.step_s,
        }

    @app.get("/api/snapshot")
    def api_snapshot() -> dict[str, Any]:
        return snapshot(sources)

    @app.get("/api/charts")
    def api_charts(minutes: float | None = None) -> JSONResponse:
        m = cfg.minutes if minutes is None else minutes
        if not (1 <= m <= 24 * 60):
            return JSONResponse({"error": "minutes must be 1-1440"}, status_code=400)
        step = max(cfg.step_s, m * 60 / 720)  # at most ~720 points per series
        return JSONResponse(charts(prom, m, step))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh dashboard",
        description="Live dashboard of a mesh from its Prometheus (and Consul): per instance verdict and reason, "
        "requests/s, TTFT and inter-token latency, tokens/s, errors, resumes, ejections, prefix-cache hit rate, "
        "CPU/memory/GPU; gateways and Consul. `ernie-mesh up` starts one on 127.0.0.1:8090.",
    )
    p.add_argument("--prometheus", default=DEFAULT_PROMETHEUS, help=f"Prometheus URL (default {DEFAULT_PROMETHEUS})")
    p.add_argument(
        "--consul",
        default=env_consul(),
        help="Consul HTTP address for verdicts and reasons (default $CONSUL_HTTP_ADDR; none: from Prometheus)",
    )
    p.add_argument("--service", default="ernie", help="engine service name in Consul (default ernie)")
    p.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        help=f"host:port to serve on (default 127.0.0.1:{DEFAULT_PORT}; loopback only unless you say otherwise)",
    )
    p.add_argument("--refresh", type=float, default=1.0, metavar="S", help="table refresh of the page (default 1 s)")
    p.add_argument("--minutes", type=float, default=15.0, help="the charts' time range (default 15)")
    p.add_argument("--step", type=float, default=5.0, metavar="S", help="the charts' resolution (default 5 s)")
    return p


def main(argv: list[str]) -> int:
    import uvicorn

    from agent.net import bind_error

    args = parser().parse_args(argv)
    cfg = DashboardConfig(
        prometheus=args.prometheus,
        consul=args.consul,
        service=args.service,
        listen=args.listen,
        refresh_s=args.refresh,
        minutes=args.minutes,
        step_s=args.step,
    )
    check_vendored()
    host, port = cfg.host_port
    err = bind_error(host, port)
    if err:
        raise ConfigError(f"cannot listen on {cfg.listen}: {err}")
    if not cfg.on_loopback:
        log.warning(
            "the dashboard listens on %s, beyond loopback: whoever reaches it sees the mesh's instances and figures",
            cfg.listen,
        )
    url_host = host if cfg.on_loopback else "127.0.0.1"
    print(
        f"ernie-mesh dashboard on http://{url_host}:{port}/ (Prometheus {cfg.prometheus}"
        + (f", Consul {cfg.consul})" if cfg.consul else ", no Consul: verdicts from Prometheus)"),
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(create_app(cfg), host=host, port=port, log_level="warning", access_log=False)
    return 0
