"""Every PromQL expression the dashboard and `ernie-mesh top` read, in one place (metric names:
docs/metrics.md). Instance figures are grouped by `instance_id`, gateway figures by `gateway`."""

from __future__ import annotations

from dataclasses import dataclass

RATE = "1m"  # the window of rates and quantiles: 4 scrapes at the default 15 s, 12 at up's 5 s
ENGINES = 'envoy_cluster_name!="ernie_xds"'  # Envoy's engine cluster(s), not the xDS control plane
API = 'envoy_http_conn_manager_prefix="openai_api"'  # Envoy's listener for clients
EJECTIONS = f"envoy_cluster_outlier_detection_ejections_enforced_total{{{ENGINES}}}"


def quantile(q: float, metric: str, by: str = "instance_id") -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket[{RATE}])))"


def hit_rate(by: str = "instance_id") -> str:
    return (
        f"sum by ({by}) (rate(vllm:prefix_cache_hits_total[5m])) "
        f"/ sum by ({by}) (rate(vllm:prefix_cache_queries_total[5m])) > -1"  # > -1 drops 0/0 (no queries)
    )


# Per instance: column -> expression (one value per instance_id).
INSTANCE: dict[str, str] = {
    "running": "sum by (instance_id) (vllm:num_requests_running)",
    "waiting": "sum by (instance_id) (vllm:num_requests_waiting)",
    "requests_s": f"sum by (instance_id) (rate(envoy_cluster_endpoint_rq_total[{RATE}]))",
    "errors_s": f"sum by (instance_id) (rate(envoy_cluster_endpoint_rq_error[{RATE}]))",
    "errors_5m": "sum by (instance_id) (increase(envoy_cluster_endpoint_rq_error[5m]))",
    "tokens_s": f"sum by (instance_id) (rate(vllm:generation_tokens_total[{RATE}]))",
    "ttft_p50_s": quantile(0.5, "vllm:time_to_first_token_seconds"),
    "ttft_p99_s": quantile(0.99, "vllm:time_to_first_token_seconds"),
    "itl_p50_s": quantile(0.5, "vllm:inter_token_latency_seconds"),
    "itl_p99_s": quantile(0.99, "vllm:inter_token_latency_seconds"),
    "cache_hit_rate": hit_rate(),
    "kv_cache_usage": "max by (instance_id) (vllm:kv_cache_usage_perc)",
    "restarts_1h": "sum by (instance_id) (increase(ernie_engine_restarts_total[1h]))",
    "cpu_cores": f"sum by (instance_id) (rate(ernie_engine_cpu_seconds_total[{RATE}]))",
    "memory_bytes": "sum by (instance_id) (ernie_engine_memory_rss_bytes)",
    "gpu_utilization": "max by (instance_id) (ernie_engine_gpu_utilization_ratio)",
    "gpu_memory_bytes": "sum by (instance_id) (ernie_engine_gpu_memory_used_bytes)",
}
# The engine agents' verdicts (when Consul is not asked): 1 for each instance's current state.
VERDICT = "max by (instance_id, state, node) (ernie_engine_verdict) == 1"
MODELS = "count by (instance_id, model) (vllm:num_requests_running)"

# Per gateway: column -> expression (one value per gateway).
GATEWAY: dict[str, str] = {
    "envoy_up": "max by (gateway) (ernie_gateway_envoy_up)",
    "consul_up": "max by (gateway) (ernie_gateway_consul_up)",
    "endpoints_healthy": 'sum by (gateway) (ernie_gateway_endpoints{state="healthy"})',
    "requests_s": f"sum by (gateway) (rate(envoy_http_downstream_rq_xx{{{API}}}[{RATE}]))",
    "errors_s": f'sum by (gateway) (rate(envoy_http_downstream_rq_xx{{{API},envoy_response_code_class="5"}}[{RATE}]))',
    "in_flight": "sum by (gateway) (ernie_gateway_relay_requests_in_flight)",
    "ejected_now": f"sum by (gateway) (envoy_cluster_outlier_detection_ejections_active{{{ENGINES}}})",
    "ejections_5m": f"sum by (gateway) (increase({EJECTIONS}[5m]))",
    "resumes_5m": "sum by (gateway) (increase(ernie_gateway_relay_resumes_total[5m]))",
    "retries_5m": f"sum by (gateway) (increase(envoy_cluster_upstream_rq_retry{{{ENGINES}}}[5m]))",
}
# Scrape targets by job: how many Prometheus found through Consul, how many answer.
TARGETS_UP = 'sum by (job) (up{job=~"ernie-.*"})'
TARGETS_FOUND = 'count by (job) (up{job=~"ernie-.*"})'


@dataclass(frozen=True)
class Line:
    expr: str
    legend: str  # a label name whose value names the series, with an optional suffix: "instance_id p50"


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    unit: str  # "reqps", "tokps", "s", "ratio", "cores", "bytes", "count"
    lines: tuple[Line, ...]
    optional: bool = False  # hidden while it has no data (GPU charts on a host without GPUs)


def _q(metric: str, what: str) -> tuple[Line, ...]:
    return (
        Line(quantile(0.5, metric), f"instance_id {what} p50"),
        Line(quantile(0.99, metric), f"instance_id {what} p99"),
    )


CHARTS: tuple[Chart, ...] = (
    Chart("passing", "Passing instances", "count", (Line('sum(ernie_engine_verdict{state="passing"})', "passing"),)),
    Chart("requests", "Requests/s per instance", "reqps", (Line(INSTANCE["requests_s"], "instance_id"),)),
    Chart("tokens", "Generated tokens/s per instance", "tokps", (Line(INSTANCE["tokens_s"], "instance_id"),)),
    Chart("ttft", "Time to first token", "s", _q("vllm:time_to_first_token_seconds", "TTFT")),
    Chart("itl", "Inter-token latency", "s", _q("vllm:inter_token_latency_seconds", "ITL")),
    Chart(
        "queue",
        "Running and waiting requests",
        "count",
        (Line(INSTANCE["running"], "instance_id running"), Line(INSTANCE["waiting"], "instance_id waiting")),
    ),
    Chart(
        "errors",
        "Errors/s (per instance; 5xx to clients per gateway)",
        "reqps",
        (Line(INSTANCE["errors_s"], "instance_id"), Line(GATEWAY["errors_s"], "gateway 5xx")),
    ),
    Chart(
        "resilience",
        "Resumes and ejections (per minute)",
        "count",
        (
            Line("sum by (gateway) (increase(ernie_gateway_relay_resumes_total[1m]))", "gateway resumes"),
            Line(
                f"sum by (gateway) (increase({EJECTIONS}[1m]))",
                "gateway ejections",
            ),
        ),
    ),
    Chart("cache", "Prefix-cache hit rate", "ratio", (Line(INSTANCE["cache_hit_rate"], "instance_id"),)),
    Chart("cpu", "CPU of the engine's processes (cores)", "cores", (Line(INSTANCE["cpu_cores"], "instance_id"),)),
    Chart(
        "memory", "Memory of the engine's processes (RSS)", "bytes", (Line(INSTANCE["memory_bytes"], "instance_id"),)
    ),
    Chart(
        "gpu",
        "GPU utilisation",
        "ratio",
        (Line(INSTANCE["gpu_utilization"], "instance_id"),),
        optional=True,
    ),
    Chart(
        "gpu_memory",
        "GPU memory of the engine's processes",
        "bytes",
        (Line(INSTANCE["gpu_memory_bytes"], "instance_id"),),
        optional=True,
    ),
)


def legend(line: Line, labels: dict[str, str]) -> str:
    label, _, suffix = line.legend.partition(" ")
    name = labels.get(label, label if not labels else "")
    return f"{name} {suffix}".strip() if name else (suffix or line.legend)
