"""`ernie-mesh status [--json]`: instances and gateways as Consul sees them, in every datacenter
Consul knows (WAN federation; or those named by --datacenter), by datacenter and zone, enriched by
each engine agent's live figures (running/waiting requests, last canary latency)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypedDict

import httpx

from agent.catalog.base import CatalogEntry, CatalogError
from agent.catalog.consul import ConsulCatalog
from agent.config import check_consul_address
from agent.naming import GATEWAY_SERVICE

AGENT_TIMEOUT_S = 2.0


class InstanceRow(TypedDict):
    """One engine instance in `status --json` (live figures None when its agent did not answer)."""

    datacenter: str
    node: str
    id: str
    address: str
    model: str
    zone: str
    verdict: str
    cause: str | None
    reason: str
    consul_status: str
    running: float | None
    waiting: float | None
    canary_latency_ms: float | None
    share: float | None  # of the requests the gateways routed over the last minute (their mean)
    agent_url: str


class GatewayRow(TypedDict):
    datacenter: str
    node: str
    id: str
    listen: str
    status: str
    note: str
    metrics_url: str
    routing: str  # "affinity:<key>" or "least-request" (its [routing])
    shares: dict[str, float]  # instance -> share of its requests over the last minute


class ZoneCount(TypedDict):
    instances: int
    passing: int


class DatacenterRow(TypedDict):
    """One datacenter's instances, by zone; `error` when it did not answer (a WAN partition)."""

    instances: int
    passing: int
    zones: dict[str, ZoneCount]
    error: str


class StatusReport(TypedDict):
    consul: str
    service: str
    instances: list[InstanceRow]
    passing: int
    models: dict[str, dict[str, int]]  # served model name -> {"instances": n, "passing": n}
    gateways: list[GatewayRow]
    datacenters: dict[str, DatacenterRow]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh status",
        description="Show every engine instance (verdict and reason, load, canary latency) "
        "and every gateway, as registered in Consul.",
    )
    p.add_argument(
        "--consul",
        default=os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500"),
        help="Consul HTTP address (default: $CONSUL_HTTP_ADDR or 127.0.0.1:8500)",
    )
    p.add_argument("--service", default="ernie", help="engine service name (default ernie)")
    p.add_argument(
        "--datacenter",
        action="append",
        metavar="DC",
        help="only this Consul datacenter (repeatable; default: every datacenter Consul knows)",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    return p


def _agent_figures(agent_urls: set[str]) -> dict[str, dict[str, Any]]:
    """instance id -> the agent's own description (live load and canary figures)."""

    def fetch(url: str) -> list[dict[str, Any]]:
        try:
            items: list[dict[str, Any]] = (
                httpx.get(f"{url}/instances", timeout=AGENT_TIMEOUT_S).json().get("instances", [])
            )
            return items
        except (httpx.HTTPError, ValueError):
            return []

    out: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max(1, min(16, len(agent_urls)))) as pool:
        for items in pool.map(fetch, sorted(agent_urls)):
            out.update({i["id"]: i for i in items})
    return out


SHARE_METRIC = "ernie_gateway_instance_share"


def _gateway_shares(metrics_urls: set[str]) -> dict[str, dict[str, float]]:
    """metrics URL -> instance -> share (ernie_gateway_instance_share of that gateway agent)."""

    def fetch(url: str) -> dict[str, float]:
        try:
            text = httpx.get(url, timeout=AGENT_TIMEOUT_S).text
        except httpx.HTTPError:
            return {}
        out = {}
        prefix = SHARE_METRIC + '{instance_id="'
        for line in text.splitlines():
            if line.startswith(prefix):
                instance, _, value = line[len(prefix) :].partition('"} ')
                try:
                    out[instance] = float(value)
                except ValueError:
                    continue
        return out

    urls = sorted(u for u in metrics_urls if u)
    with ThreadPoolExecutor(max(1, min(16, len(urls)))) as pool:
        return dict(zip(urls, pool.map(fetch, urls)))


def _instance_row(e: CatalogEntry, live: dict[str, Any], share: float | None = None) -> InstanceRow:
    v = e.verdict
    return {
        "datacenter": e.datacenter,
        "node": e.node,
        "id": e.instance_id,
        "address": f"{e.address}:{e.port}",
        "model": e.meta.get("served_model_name") or e.meta.get("model", ""),
        "zone": e.meta.get("zone", ""),
        "verdict": v.state.value,
        "cause": v.cause.value if v.cause else None,
        "reason": v.reason,
        "consul_status": e.status.value,
        "running": live.get("running"),
        "waiting": live.get("waiting"),
        "canary_latency_ms": live.get("canary_latency_ms"),
        "share": share,
        "agent_url": e.meta.get("agent_url", ""),
    }


def _gateway_row(e: CatalogEntry, shares: dict[str, float]) -> GatewayRow:
    return {
        "datacenter": e.datacenter,
        "node": e.node,
        "id": e.instance_id,
        "listen": f"{e.address}:{e.port}",
        "status": e.status.value,
        "note": e.note,
        "metrics_url": e.meta.get("metrics_url", ""),
        "routing": e.meta.get("routing", ""),
        "shares": shares,
    }


def models_of(instances: list[InstanceRow]) -> dict[str, dict[str, int]]:
    """Per served model name: its instances and how many pass (the gateways route a model's
    requests to its passing instances only)."""
    out: dict[str, dict[str, int]] = {}
    for r in instances:
        m = out.setdefault(r["model"] or "-", {"instances": 0, "passing": 0})
        m["instances"] += 1
        m["passing"] += r["verdict"] == "passing"
    return dict(sorted(out.items()))


def _read_datacenter(
    consul: str, service: str, dc: str, local: str
) -> tuple[list[CatalogEntry], list[CatalogEntry], str]:
    """(engines, gateways, error) of one datacenter, read through the local agent (?dc=)."""
    catalog = ConsulCatalog(consul, os.environ.get("CONSUL_HTTP_TOKEN"), datacenter="" if dc == local else dc)
    try:
        _i, engines = catalog.instances(service)
        _j, gateways = catalog.instances(GATEWAY_SERVICE)
    except CatalogError as e:
        if dc == local:
            raise
        return [], [], str(e)
    fill = (
        [replace(e, datacenter=e.datacenter or dc) for e in engines],
        [replace(g, datacenter=g.datacenter or dc) for g in gateways],
    )
    return fill[0], fill[1], ""


def collect(consul: str, service: str, datacenters: list[str] | None = None) -> StatusReport:
    catalog = ConsulCatalog(consul, os.environ.get("CONSUL_HTTP_TOKEN"))
    try:
        local = catalog.local_datacenter()
    except CatalogError:
        local = ""  # a token without agent:read: the catalog's entries still name their datacenter
    if datacenters is None:
        try:
            datacenters = catalog.datacenters() or [local]
        except CatalogError:
            datacenters = [local]
    engines: list[CatalogEntry] = []
    gateways: list[CatalogEntry] = []
    errors: dict[str, str] = {}
    for dc in datacenters:
        e, g, error = _read_datacenter(consul, service, dc, local)
        engines += e
        gateways += g
        errors[dc] = error
    live = _agent_figures({e.meta["agent_url"] for e in engines if e.meta.get("agent_url")})
    by_gateway = _gateway_shares({g.meta.get("metrics_url", "") for g in gateways})
    reported = [s for s in by_gateway.values() if s]

    def share(iid: str) -> float | None:
        seen = [s.get(iid, 0.0) for s in reported]
        return sum(seen) / len(seen) if seen else None

    instances = sorted(
        (_instance_row(e, live.get(e.instance_id, {}), share(e.instance_id)) for e in engines),
        key=lambda r: (r["datacenter"], r["zone"], r["node"], r["id"]),
    )
    return {
        "consul": consul,
        "service": service,
        "instances": instances,
        "passing": sum(1 for r in instances if r["verdict"] == "passing"),
        "models": models_of(instances),
        "gateways": sorted(
            (_gateway_row(g, by_gateway.get(g.meta.get("metrics_url", ""), {})) for g in gateways),
            key=lambda r: (r["datacenter"], r["id"]),
        ),
        "datacenters": by_datacenter(instances, errors),
    }


def by_datacenter(instances: list[InstanceRow], errors: dict[str, str]) -> dict[str, DatacenterRow]:
    """Counts per datacenter and zone (every datacenter asked, those that did not answer too)."""
    out: dict[str, DatacenterRow] = {
        dc: {"instances": 0, "passing": 0, "zones": {}, "error": error} for dc, error in errors.items()
    }
    for r in instances:
        row = out.setdefault(r["datacenter"], {"instances": 0, "passing": 0, "zones": {}, "error": ""})
        zone = row["zones"].setdefault(r["zone"], {"instances": 0, "passing": 0})
        passing = 1 if r["verdict"] == "passing" else 0
        row["instances"] += 1
        row["passing"] += passing
        zone["instances"] += 1
        zone["passing"] += passing
    return dict(sorted(out.items()))


def _fmt(v: object, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"{v}{unit}"


def render(report: StatusReport) -> str:
    lines = [
        f"{report['service']}: {report['passing']}/{len(report['instances'])} instances passing "
        f"(Consul {report['consul']})",
    ]
    for dc, d in report.get("datacenters", {}).items():
        if d["error"]:
            lines.append(f"  datacenter {dc}: not answering ({d['error']})")
            continue
        zones = ", ".join(f"{z or '-'} {c['passing']}/{c['instances']}" for z, c in sorted(d["zones"].items()))
        lines.append(
            f"  datacenter {dc}: {d['passing']}/{d['instances']} passing" + (f" (zones: {zones})" if zones else "")
        )
    lines.append("")
    header = ("DC", "ZONE", "NODE", "INSTANCE", "MODEL", "VERDICT", "CAUSE", "RUN", "WAIT", "CANARY", "SHARE", "REASON")
    rows = [header] + [
        (
            r.get("datacenter") or "-",
            r["zone"] or "-",
            r["node"],
            r["id"],
            r["model"],
            r["verdict"],
            r["cause"] or "-",
            _fmt(r["running"]),
            _fmt(r["waiting"]),
            _fmt(r["canary_latency_ms"], "ms"),
            "-" if r["share"] is None else f"{r['share']:.0%}",
            r["reason"],
        )
        for r in report["instances"]
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    lines.append("")
    models = report.get("models", {})
    if len(models) > 1:
        lines.append("models: " + ", ".join(f"{m} {c['passing']}/{c['instances']} passing" for m, c in models.items()))
        lines.append("")
    if report["gateways"]:
        lines.append("gateways:")
        for g in report["gateways"]:
            routing = f"routing {g['routing']}" if g["routing"] else ""
            dc = f"{g['datacenter']}  " if g.get("datacenter") else ""
            lines.append(f"  {dc}{g['id']}  {g['listen']}  {g['status']}  {routing}  {g['note']}".rstrip())
    else:
        lines.append("gateways: none registered")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check_consul_address(args.consul)  # a bad address: one line and exit 2 (agent.cli)
    try:
        report = collect(args.consul, args.service, args.datacenter)
    except CatalogError as e:
        print(f"ernie-mesh status: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
