"""The mesh's Prometheus recording and alerting rules, as data (rendered to YAML by render_rules).

Every alert is `<signal> <op> <threshold>`: the signal is a plain expression that always has
series while the mesh runs (a recorded series or a gauge), so a test can check that each signal
returns data against a live mesh, not only that the expression parses. Jobs and labels come from
agent/local/prometheus.py; names and meanings are documented in docs/metrics.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.durations import go_duration

RULES_FILE_NAME = "ernie-mesh.rules.yml"

# The xDS control-plane cluster in the Envoy bootstrap: not an engine cluster.
ENGINE_CLUSTERS = 'envoy_cluster_name!="ernie_xds"'


@dataclass(frozen=True)
class Record:
    record: str
    expr: str


@dataclass(frozen=True)
class Alert:
    name: str
    signal: str
    op: str
    threshold: float
    for_s: float
    severity: str
    summary: str
    description: str

    @property
    def expr(self) -> str:
        return f"{self.signal} {self.op} {self.threshold:g}"


RECORDS = (
    Record(
        "ernie:instances_passing:count",
        """\
sum by (service, model) (
    max by (service, instance_id) (ernie_engine_verdict{state="passing"})
  * on (service, instance_id) group_left (model)
    count by (service, instance_id, model) (up{job="ernie-vllm"})
)
or on (service, model)
  0 * count by (service, model) (up{job="ernie-vllm"})""",
    ),
    Record(
        "ernie:envoy_retry_ratio:rate5m",
        f"""\
sum by (gateway, envoy_cluster_name) (rate(envoy_cluster_upstream_rq_retry{{{ENGINE_CLUSTERS}}}[5m]))
/
clamp_min(sum by (gateway, envoy_cluster_name) (rate(envoy_cluster_upstream_rq_total{{{ENGINE_CLUSTERS}}}[5m])), 1e-9)""",  # noqa: E501 (PromQL)
    ),
    Record(
        "ernie:envoy_ejections:increase5m",
        f"""\
sum by (gateway, envoy_cluster_name) (
  increase(envoy_cluster_outlier_detection_ejections_enforced_total{{{ENGINE_CLUSTERS}}}[5m])
)""",
    ),
    Record(
        "ernie:gateway_consul_staleness_seconds",
        "time() - max by (gateway) (ernie_gateway_consul_last_success_timestamp_seconds)",
    ),
)

ALERTS = (
    Alert(
        "ErnieNoHealthyInstance",
        "ernie:instances_passing:count",
        "<",
        1,
        15,
        "critical",
        "No healthy {{ $labels.model }} instance",
        "No instance of service {{ $labels.service }} serving {{ $labels.model }} has a passing verdict: "
        "requests for this model fail. `ernie-mesh status` shows each instance's reason.",
    ),
    Alert(
        "ErnieGatewayNoHealthyEndpoint",
        'ernie_gateway_endpoints{state="healthy"}',
        "<",
        1,
        15,
        "critical",
        "Gateway {{ $labels.gateway }} has no healthy endpoint",
        "The snapshot gateway {{ $labels.gateway }} serves to its Envoy holds no healthy endpoint: "
        "Envoy answers every request with 503.",
    ),
    Alert(
        "ErnieInstanceCritical",
        'ernie_engine_verdict{state="critical"}',
        ">",
        0,
        60,
        "warning",
        "Instance {{ $labels.instance_id }} critical for more than a minute",
        "The engine agent on {{ $labels.node }} has judged {{ $labels.instance_id }} critical for over a "
        "minute (out of rotation). See the reason in Consul or `ernie-mesh status`.",
    ),
    Alert(
        "ErnieScrapeTargetDown",
        'up{job=~"ernie-engine-agent|ernie-gateway-agent|ernie-envoy"}',
        "<",
        1,
        60,
        "warning",
        "{{ $labels.job }} {{ $labels.instance }} does not answer scrapes",
        "Prometheus cannot scrape {{ $labels.job }} at {{ $labels.instance }} (node {{ $labels.node }}) for a "
        "minute: the agent or Envoy is down or unreachable.",
    ),
    Alert(
        "ErnieRetryRatioHigh",
        "ernie:envoy_retry_ratio:rate5m",
        ">",
        0.1,
        300,
        "warning",
        "Gateway {{ $labels.gateway }} retries more than 10% of upstream requests",
        "Over 5 minutes, {{ $value | humanizePercentage }} of the upstream requests of gateway "
        "{{ $labels.gateway }} were retries: instances fail requests (5xx, resets, refused connections).",
    ),
    Alert(
        "ErnieEjections",
        "ernie:envoy_ejections:increase5m",
        ">",
        0,
        0,
        "warning",
        "Gateway {{ $labels.gateway }} ejected instances",
        "Envoy's outlier detection on gateway {{ $labels.gateway }} ejected {{ $value }} host(s) in the last "
        "5 minutes: an instance returns errors while its agent still judges it passing.",
    ),
    Alert(
        "ErnieConsulWatchStale",
        "ernie:gateway_consul_staleness_seconds",
        ">",
        150,
        0,
        "critical",
        "Gateway {{ $labels.gateway }} has not read the catalog for {{ $value | humanizeDuration }}",
        "The Consul watch of gateway {{ $labels.gateway }} last succeeded {{ $value | humanizeDuration }} "
        "ago (a blocking read returns at least every ~64 s): its Envoy routes on a stale instance list.",
    ),
    Alert(
        "ErnieConsulWatchFailing",
        "ernie_gateway_consul_up",
        "<",
        1,
        60,
        "warning",
        "Gateway {{ $labels.gateway }} cannot read the Consul catalog",
        "Catalog reads of gateway {{ $labels.gateway }} fail for a minute; it keeps serving its last snapshot.",
    ),
    Alert(
        "ErnieXdsNack",
        "increase(ernie_gateway_xds_nacks_total[5m])",
        ">",
        0,
        0,
        "warning",
        "Envoy rejected a snapshot of gateway {{ $labels.gateway }}",
        "Envoy NACKed an xDS update from gateway {{ $labels.gateway }}: it keeps its previous endpoints.",
    ),
    Alert(
        "ErnieEnvoyDown",
        "ernie_gateway_envoy_up",
        "<",
        1,
        30,
        "critical",
        "Envoy of gateway {{ $labels.gateway }} is not live",
        "The gateway agent {{ $labels.gateway }} reports its Envoy not live and ready for 30 s.",
    ),
)


def rule_groups(for_s: float | None = None) -> dict[str, Any]:
    """The rule file as data; `for_s` replaces every alert's `for` (tests)."""
    alerts = []
    for a in ALERTS:
        alerts.append(
            {
                "alert": a.name,
                "expr": a.expr,
                "for": go_duration(a.for_s if for_s is None else for_s),
                "labels": {"severity": a.severity},
                "annotations": {"summary": a.summary, "description": a.description},
            }
        )
    return {
        "groups": [
            {"name": "ernie-mesh.records", "rules": [{"record": r.record, "expr": r.expr} for r in RECORDS]},
            {"name": "ernie-mesh.alerts", "rules": alerts},
        ]
    }


HEADER = """\
# ernie-mesh alerting and recording rules. Every alert is `<signal> <op> <threshold>`.
# GENERATED by deploy/prometheus/render.py from agent/local/prometheus_rules.py: edit that and
# re-render. Metric names and labels: docs/metrics.md.
"""


def render_rules(for_s: float | None = None) -> str:
    from agent.local.prometheus import to_yaml  # no cycle at import time

    return HEADER + to_yaml(rule_groups(for_s))
