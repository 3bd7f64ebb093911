"""The engine agent's Prometheus metrics (own registry; names documented in docs/metrics.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.catalog.base import Verdict, VerdictState

PROBE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DRAIN_BUCKETS_S = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
LAG_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class EngineAgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.verdict = Gauge(
            "ernie_engine_verdict",
            "1 for the instance's current verdict state, 0 for the others",
            ["instance_id", "state"],
            registry=r,
        )
        self.probe_duration = Histogram(
            "ernie_engine_probe_duration_seconds",
            "Duration of health probes",
            ["instance_id", "probe"],
            buckets=PROBE_BUCKETS_S,
            registry=r,
        )
        self.canary_failures = Counter(
            "ernie_engine_canary_failures_total", "Canary generations that failed", ["instance_id"], registry=r
        )
        self.critical = Counter(
            "ernie_engine_critical_total",
            "Transitions to critical, by the verdict's cause (exited, crash_loop, stopped, "
            "startup_timeout, health_failed, stuck, hung)",
            ["instance_id", "reason"],
            registry=r,
        )
        self.restarts = Counter(
            "ernie_engine_restarts_total", "Engine process restarts by the agent", ["instance_id"], registry=r
        )
        self.draining = Gauge("ernie_engine_draining", "1 while the instance drains", ["instance_id"], registry=r)
        self.drain_duration = Histogram(
            "ernie_engine_drain_duration_seconds",
            "From drain start to deregistration",
            ["instance_id"],
            buckets=DRAIN_BUCKETS_S,
            registry=r,
        )
        self.requests_running = Gauge(
            "ernie_engine_requests_running", "vllm:num_requests_running as last probed", ["instance_id"], registry=r
        )
        self.requests_waiting = Gauge(
            "ernie_engine_requests_waiting", "vllm:num_requests_waiting as last probed", ["instance_id"], registry=r
        )
        self.consul_errors = Counter(
            "ernie_engine_consul_errors_total", "Failed writes to Consul", ["instance_id"], registry=r
        )
        self.loop_lag = Histogram(
            "ernie_engine_agent_loop_lag_seconds",
            "How late the agent's event loop ran a timer (probes, canaries and TTL refreshes wait as long)",
            buckets=LAG_BUCKETS_S,
            registry=r,
        )

    def set_verdict(self, instance: str, state: VerdictState) -> None:
        for s in VerdictState:
            self.verdict.labels(instance, s.value).set(1 if s is state else 0)


def cause_label(verdict: Verdict) -> str:
    """The bounded label for a verdict: its cause (metrics never carry the reason's free text)."""
    return verdict.cause.value if verdict.cause is not None else "other"
