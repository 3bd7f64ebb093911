#!/usr/bin/env python3
"""Generate deploy/grafana/ernie-mesh.json, the mesh's Grafana dashboard (run after editing this).

  python deploy/grafana/dashboard.py            # rewrite ernie-mesh.json next to this file
  python deploy/grafana/dashboard.py --check    # exit 1 if the JSON is not what this file generates

Queries use the jobs and labels of deploy/prometheus/prometheus.yml and the recorded series of
its rules; metric names are documented in docs/metrics.md. Import the JSON in Grafana (it asks
for a Prometheus data source through the `datasource` variable) or provision it from a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "ernie-mesh.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
ENGINES = 'envoy_cluster_name!="ernie_xds"'  # the engine cluster(s), not the xDS control plane


def q(expr: str, legend: str) -> tuple[str, str]:
    return expr, legend


def quantiles(metric: str, by: str, legend: str, matchers: str = "") -> list[tuple[str, str]]:
    sel = f"{metric}_bucket{{{matchers}}}" if matchers else f"{metric}_bucket"
    return [
        q(f"histogram_quantile({p}, sum by (le, {by}) (rate({sel}[{RI}])))", f"{legend} p{pct}")
        for p, pct in ((0.5, 50), (0.99, 99))
    ]


ROWS: list[tuple[str, list[dict]]] = [
    (
        "Instances",
        [
            dict(
                title="Healthy instances",
                unit="short",
                description=(
                    "Instances with a passing verdict per model (what Consul and the gateways route to), and the "
                    "healthy endpoints each gateway's Envoy holds."
                ),
                targets=[
                    q("ernie:instances_passing:count", "{{model}} passing ({{service}})"),
                    q('ernie_gateway_endpoints{state="healthy"}', "gateway {{gateway}} healthy endpoints"),
                ],
            ),
            dict(
                title="Instances by verdict",
                unit="short",
                stack=True,
                description=("Verdicts of the engine agents: starting, passing, draining, critical."),
                targets=[
                    q("sum by (state) (ernie_engine_verdict)", "{{state}}"),
                ],
            ),
            dict(
                title="Firing alerts",
                unit="short",
                description="ernie-mesh alerts firing now.",
                targets=[
                    q(
                        'count by (alertname) (ALERTS{alertstate="firing", alertname=~"Ernie.*"}) or on () vector(0)',
                        "{{alertname}}",
                    ),
                ],
            ),
            dict(
                title="Scrape targets up",
                unit="short",
                description="Targets found through Consul, by job.",
                targets=[
                    q('sum by (job) (up{job=~"ernie-.*"})', "{{job}} up"),
                    q('count by (job) (up{job=~"ernie-.*"})', "{{job}} discovered"),
                ],
            ),
        ],
    ),
    (
        "Traffic",
        [
            dict(
                title="Requests per instance (gateway)",
                unit="reqps",
                description=("Upstream requests Envoy sent to each instance (per-endpoint stats), all gateways."),
                targets=[
                    q(f"sum by (instance_id) (rate(envoy_cluster_endpoint_rq_total[{RI}]))", "{{instance_id}}"),
                ],
            ),
            dict(
                title="Errors per instance (gateway)",
                unit="reqps",
                description=(
                    "Upstream requests to each instance that failed (5xx, reset, connect failure), all gateways."
                ),
                targets=[
                    q(f"sum by (instance_id) (rate(envoy_cluster_endpoint_rq_error[{RI}]))", "{{instance_id}}"),
                ],
            ),
            dict(
                title="Requests finished per instance (engine)",
                unit="reqps",
                description=(
                    "Requests each engine finished, by finish reason (includes the agents' 1-token canaries; "
                    "`abort` = cut short)."
                ),
                targets=[
                    q(
                        f"sum by (instance_id, finished_reason) (rate(vllm:request_success_total[{RI}]))",
                        "{{instance_id}} {{finished_reason}}",
                    ),
                ],
            ),
            dict(
                title="Gateway responses by class",
                unit="reqps",
                description=(
                    "What clients got from each gateway (Envoy downstream), by status class; 5 = errors, including "
                    "Envoy's own 503 when no instance is healthy."
                ),
                targets=[
                    q(
                        f"sum by (gateway, envoy_response_code_class) (rate(envoy_http_downstream_rq_xx"
                        f'{{envoy_http_conn_manager_prefix="openai_api"}}[{RI}]))',
                        "{{gateway}} {{envoy_response_code_class}}xx",
                    ),
                ],
            ),
        ],
    ),
    (
        "Latency",
        [
            dict(
                title="Time to first token",
                unit="s",
                description="vLLM's TTFT per instance.",
                targets=quantiles("vllm:time_to_first_token_seconds", "instance_id", "{{instance_id}}"),
            ),
            dict(
                title="Inter-token latency",
                unit="s",
                description="vLLM's time between tokens per instance.",
                targets=quantiles("vllm:inter_token_latency_seconds", "instance_id", "{{instance_id}}"),
            ),
            dict(
                title="End-to-end request latency",
                unit="s",
                description="vLLM's request latency per instance.",
                targets=quantiles("vllm:e2e_request_latency_seconds", "instance_id", "{{instance_id}}"),
            ),
            dict(
                title="Gateway upstream latency",
                unit="ms",
                description=("Envoy's upstream request time (to the full response), per gateway."),
                targets=quantiles("envoy_cluster_upstream_rq_time", "gateway", "{{gateway}}", ENGINES),
            ),
        ],
    ),
    (
        "Load",
        [
            dict(
                title="Queue depth per instance",
                unit="short",
                description=("Requests waiting for a slot, and running, per instance (vLLM)."),
                targets=[
                    q("sum by (instance_id) (vllm:num_requests_waiting)", "{{instance_id}} waiting"),
                    q("sum by (instance_id) (vllm:num_requests_running)", "{{instance_id}} running"),
                ],
            ),
            dict(
                title="KV cache usage per instance",
                unit="percentunit",
                description="vLLM's KV-cache usage (1 = full).",
                targets=[q("max by (instance_id) (vllm:kv_cache_usage_perc)", "{{instance_id}}")],
            ),
        ],
    ),
    (
        "Resources",
        [
            dict(
                title="CPU per instance",
                unit="short",
                description="CPU cores used by each engine's processes (API server and descendants), from its agent.",
                targets=[q(f"sum by (instance_id) (rate(ernie_engine_cpu_seconds_total[{RI}]))", "{{instance_id}}")],
            ),
            dict(
                title="Memory per instance",
                unit="bytes",
                description=(
                    "Resident memory of each engine's processes, summed (an upper bound: shared pages count twice)."
                ),
                targets=[q("sum by (instance_id) (ernie_engine_memory_rss_bytes)", "{{instance_id}}")],
            ),
            dict(
                title="GPU per instance",
                unit="percentunit",
                description="NVML utilisation of the GPUs each engine uses, and the share of their memory it holds "
                "(GPU hosts only: empty elsewhere).",
                targets=[
                    q("max by (instance_id) (ernie_engine_gpu_utilization_ratio)", "{{instance_id}} utilisation"),
                    q(
                        "sum by (instance_id) (ernie_engine_gpu_memory_used_bytes) "
                        "/ sum by (instance_id) (ernie_engine_gpu_memory_total_bytes)",
                        "{{instance_id}} memory",
                    ),
                ],
            ),
        ],
    ),
    (
        "Resilience",
        [
            dict(
                title="Retries",
                unit="reqps",
                description=(
                    "Requests Envoy retried on another instance, those retries that succeeded, and the share of "
                    "upstream requests that were retries (alert above 10%)."
                ),
                targets=[
                    q(
                        f"sum by (gateway) (rate(envoy_cluster_upstream_rq_retry{{{ENGINES}}}[{RI}]))",
                        "{{gateway}} retries",
                    ),
                    q(
                        f"sum by (gateway) (rate(envoy_cluster_upstream_rq_retry_success{{{ENGINES}}}[{RI}]))",
                        "{{gateway}} retries that succeeded",
                    ),
                    q("ernie:envoy_retry_ratio:rate5m", "{{gateway}} retry ratio (5m)"),
                ],
            ),
            dict(
                title="Outlier ejections",
                unit="short",
                description=("Hosts Envoy has ejected now, and new ejections, per gateway."),
                targets=[
                    q(
                        f"sum by (gateway) (envoy_cluster_outlier_detection_ejections_active{{{ENGINES}}})",
                        "{{gateway}} ejected now",
                    ),
                    q(
                        f"sum by (gateway) (increase(envoy_cluster_outlier_detection_ejections_enforced_total"
                        f"{{{ENGINES}}}[{RI}]))",
                        "{{gateway}} new ejections",
                    ),
                ],
            ),
            dict(
                title="Failovers",
                unit="short",
                description=(
                    "Instances taken out of rotation (turned critical, by reason), engine restarts by their agent, "
                    "and instances draining."
                ),
                targets=[
                    q(
                        f"sum by (instance_id, reason) (increase(ernie_engine_critical_total[{RI}]))",
                        "{{instance_id}} critical: {{reason}}",
                    ),
                    q(
                        f"sum by (instance_id) (increase(ernie_engine_restarts_total[{RI}]))",
                        "{{instance_id}} restarted",
                    ),
                    q('sum by (instance_id) (ernie_engine_verdict{state="draining"})', "{{instance_id}} draining"),
                ],
            ),
            dict(
                title="Health probes and canaries",
                unit="s",
                description=("p99 latency of the engine agents' /health probes and 1-token canary generations."),
                targets=[
                    q(
                        f"histogram_quantile(0.99, sum by (le, instance_id, probe) "
                        f"(rate(ernie_engine_probe_duration_seconds_bucket[{RI}])))",
                        "{{instance_id}} {{probe}} p99",
                    ),
                ],
            ),
        ],
    ),
    (
        "Control plane",
        [
            dict(
                title="xDS push latency",
                unit="s",
                description=("From a catalog change seen by a gateway's Consul watch to its Envoy's ACK."),
                targets=quantiles("ernie_gateway_xds_push_latency_seconds", "gateway", "{{gateway}}")
                + [q(f"sum by (gateway) (rate(ernie_gateway_xds_pushes_total[{RI}]))", "{{gateway}} pushes/s")],
            ),
            dict(
                title="Consul watch",
                unit="s",
                description=(
                    "Seconds since each gateway's last successful catalog read (alert above 150 s) and failed reads."
                ),
                targets=[
                    q("ernie:gateway_consul_staleness_seconds", "{{gateway}} since last read"),
                    q(
                        f"sum by (gateway) (rate(ernie_gateway_consul_watch_errors_total[{RI}]))",
                        "{{gateway}} failed reads/s",
                    ),
                ],
            ),
        ],
    ),
]


def build() -> dict:
    panels: list[dict] = []
    y = 0
    pid = 1
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "type": "row",
                "title": row_title,
                "id": pid,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid += 1
        y += 1
        for i, spec in enumerate(row_panels):
            x = 0 if i % 2 == 0 else 12
            if i and i % 2 == 0:
                y += 8
            panels.append(
                {
                    "type": "timeseries",
                    "title": spec["title"],
                    "description": spec.get("description", ""),
                    "id": pid,
                    "datasource": DS,
                    "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
                    "fieldConfig": {
                        "defaults": {
                            "unit": spec.get("unit", "short"),
                            "custom": {
                                "stacking": {"mode": "normal" if spec.get("stack") else "none", "group": "A"},
                                "fillOpacity": 10,
                                "showPoints": "never",
                            },
                        },
                        "overrides": [],
                    },
                    "options": {
                        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"},
                    },
                    "targets": [
                        {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + n)}
                        for n, (expr, legend) in enumerate(spec["targets"])
                    ],
                }
            )
            pid += 1
        y += 8
    return {
        "title": "ernie-mesh",
        "uid": "ernie-mesh",
        "description": "High availability for vLLM: instances, traffic, latency, load, failovers, control plane.",
        "tags": ["ernie-mesh", "vllm", "envoy", "consul"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                }
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="fail if ernie-mesh.json differs from the generated one")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
