"""The mesh at one instant, as the dashboard page and `ernie-mesh top` show it.

Figures come from Prometheus (agent/dashboard/queries.py). Verdicts and their reasons come from
Consul when its address is given (what the gateways route on, seconds fresher than a scrape), else
from the engine agents' `ernie_engine_verdict` in Prometheus (no reason text there: metrics carry
bounded labels only). `charts()` returns the charts' time series on one time grid, for uPlot.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agent.dashboard import queries
from agent.dashboard.incidents import VerdictWatch
from agent.dashboard.prom import Prometheus, PrometheusError

VERDICT_ORDER = ("critical", "starting", "draining", "passing")  # worst first: the table sorts by it


@dataclass(frozen=True)
class Sources:
    prometheus: Prometheus
    consul: str | None = None  # host:port; None: verdicts from Prometheus
    service: str = "ernie"
    watch: VerdictWatch | None = None  # every verdict change as it happens (a crash flaps for ~1 s)


def _by(results: list[tuple[dict[str, str], float]], label: str) -> dict[str, float]:
    return {labels.get(label, ""): v for labels, v in results if labels.get(label)}


def _run_queries(prom: Prometheus, exprs: dict[str, str]) -> tuple[dict[str, list[Any]], list[str]]:
    """Every expression at once (Prometheus answers each in milliseconds; the round trips add up)."""
    errors: list[str] = []

    def one(item: tuple[str, str]) -> tuple[str, list[Any]]:
        key, expr = item
        try:
            return key, prom.query(expr)
        except PrometheusError as e:
            errors.append(str(e))
            return key, []

    with ThreadPoolExecutor(8) as pool:
        results = dict(pool.map(one, exprs.items()))
    return results, sorted(set(errors))


def _consul_view(consul: str, service: str) -> tuple[dict[str, Any] | None, str]:
    """Instances (verdict, cause, reason) and gateways (check status, note) as Consul has them: two
    catalog reads, milliseconds (not the engine agents' /instances: Prometheus has their figures)."""
    import os

    from agent.catalog.consul import ConsulCatalog
    from agent.naming import GATEWAY_SERVICE

    try:
        catalog = ConsulCatalog(consul, os.environ.get("CONSUL_HTTP_TOKEN"))
        _i, engines = catalog.instances(service)
        _j, gateways = catalog.instances(GATEWAY_SERVICE)
    except Exception as e:  # CatalogError, and python-consul2's own errors for a refused connection
        return None, f"Consul at {consul}: {e or type(e).__name__}"
    instances = [
        {
            "id": e.instance_id,
            "node": e.node,
            "model": e.meta.get("served_model_name") or e.meta.get("model", ""),
            "verdict": e.verdict.state.value,
            "cause": e.verdict.cause.value if e.verdict.cause else None,
            "reason": e.verdict.reason,
        }
        for e in engines
    ]
    gws = [
        # Prometheus labels a gateway's series with its meta gateway_name (else its service ID)
        {"id": g.meta.get("gateway_name") or g.instance_id, "status": g.status.value, "note": g.note}
        for g in gateways
    ]
    return {"instances": instances, "gateways": gws}, ""


def _consul_health(consul: str) -> dict[str, Any]:
    from agent.catalog.consul import ConsulCatalog

    try:
        leader = ConsulCatalog(consul).leader()
    except Exception as e:
        return {"address": consul, "up": False, "leader": "", "error": str(e) or type(e).__name__}
    return {"address": consul, "up": bool(leader), "leader": leader, "error": "" if leader else "no leader"}


def snapshot(src: Sources) -> dict[str, Any]:
    """Instances, gateways, Consul and Prometheus health now (JSON-ready)."""
    prom = src.prometheus
    exprs = {f"i:{k}": e for k, e in queries.INSTANCE.items()}
    exprs |= {f"g:{k}": e for k, e in queries.GATEWAY.items()}
    exprs |= {"verdict": queries.VERDICT, "models": queries.MODELS}
    exprs |= {"targets_up": queries.TARGETS_UP, "targets_found": queries.TARGETS_FOUND}
    with ThreadPoolExecutor(2) as pool:
        consul_future = pool.submit(_consul_view, src.consul, src.service) if src.consul else None
        health_future = pool.submit(_consul_health, src.consul) if src.consul else None
        results, prom_errors = _run_queries(prom, exprs)
        consul_report, consul_error = consul_future.result() if consul_future else (None, "")
        consul_health = health_future.result() if health_future else None

    instances: dict[str, dict[str, Any]] = {}

    def row(iid: str) -> dict[str, Any]:
        return instances.setdefault(
            iid,
            {"id": iid, "node": "", "model": "", "verdict": "unknown", "cause": None, "reason": "", "source": ""},
        )

    for labels, _v in results["verdict"]:
        r = row(labels["instance_id"])
        r.update(verdict=labels.get("state", "unknown"), node=labels.get("node", ""), source="prometheus")
    for labels, _v in results["models"]:
        if labels.get("instance_id") in instances or not consul_report:
            row(labels["instance_id"])["model"] = labels.get("model", "")
    if consul_report is not None:
        in_consul = {c["id"] for c in consul_report["instances"]}
        for iid in list(instances):
            if iid not in in_consul:  # deregistered (stopped, drained): Prometheus' last samples linger
                del instances[iid]
        for c in consul_report["instances"]:
            r = row(c["id"])
            r.update(
                node=c["node"],
                model=c["model"],
                verdict=c["verdict"],
                cause=c["cause"],
                reason=c["reason"],
                source="consul",
            )
    for key in queries.INSTANCE:
        for iid, v in _by(results[f"i:{key}"], "instance_id").items():
            if iid in instances:
                instances[iid][key] = v
    recent = src.watch.recent() if src.watch else {}
    for r in instances.values():
        for key in queries.INSTANCE:
            r.setdefault(key, None)
        r["last_critical"] = recent.get(r["id"])  # {reason, at, ago_s} of a critical verdict seen lately

    gateways: dict[str, dict[str, Any]] = {}
    for key in queries.GATEWAY:
        for gw, v in _by(results[f"g:{key}"], "gateway").items():
            gateways.setdefault(gw, {"id": gw, "status": "", "note": ""})[key] = v
    if consul_report is not None:
        for g in consul_report["gateways"]:
            gateways.setdefault(g["id"], {"id": g["id"]}).update(status=g["status"], note=g["note"])
    for g in gateways.values():
        for key in queries.GATEWAY:
            g.setdefault(key, None)
        g.setdefault("status", "")
        g.setdefault("note", "")

    found = _by(results["targets_found"], "job")
    up = _by(results["targets_up"], "job")
    rows = sorted(instances.values(), key=lambda r: (_rank(r["verdict"]), r["node"], r["id"]))
    return {
        "time": time.time(),
        "prometheus": {"url": prom.url, "up": not prom_errors, "error": "; ".join(prom_errors[:2])},
        "consul": (consul_health or {}) | ({"error": consul_error} if consul_error else {}) if src.consul else None,
        "service": src.service,
        "instances": rows,
        "passing": sum(1 for r in rows if r["verdict"] == "passing"),
        "gateways": sorted(gateways.values(), key=lambda g: g["id"]),
        "targets": {job: {"up": up.get(job, 0.0), "found": n} for job, n in sorted(found.items())},
    }


def _rank(verdict: str) -> int:
    return VERDICT_ORDER.index(verdict) if verdict in VERDICT_ORDER else -1


def charts(prom: Prometheus, minutes: float = 15.0, step_s: float = 5.0, now: float | None = None) -> dict[str, Any]:
    """Every chart's series over the last `minutes`, aligned on one grid: {"x": [t...], "charts":
    [{id, title, unit, series: [{label, values}]}]} (values None where a series has no sample)."""
    end = now if now is not None else time.time()
    end -= end % step_s
    start = end - minutes * 60
    grid = [start + i * step_s for i in range(int(round((end - start) / step_s)) + 1)]
    index = {round(t, 3): i for i, t in enumerate(grid)}
    lines = [(c, n, line) for c in queries.CHARTS for n, line in enumerate(c.lines)]
    errors: list[str] = []

    def one(item: tuple[queries.Chart, int, queries.Line]) -> list[tuple[dict[str, str], list[Any]]]:
        try:
            return prom.query_range(item[2].expr, start, end, step_s)
        except PrometheusError as e:
            errors.append(str(e))
            return []

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, lines))
    out: dict[str, dict[str, Any]] = {
        c.id: {"id": c.id, "title": c.title, "unit": c.unit, "optional": c.optional, "series": []}
        for c in queries.CHARTS
    }
    for (chart, _n, line), series in zip(lines, answers):
        for labels, values in sorted(series, key=lambda s: queries.legend(line, s[0])):
            aligned: list[float | None] = [None] * len(grid)
            for t, v in values:
                i = index.get(round(t, 3))
                if i is not None:
                    aligned[i] = v
            out[chart.id]["series"].append({"label": queries.legend(line, labels), "values": aligned})
    return {"x": grid, "step_s": step_s, "charts": list(out.values()), "error": "; ".join(sorted(set(errors))[:2])}
