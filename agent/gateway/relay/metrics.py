"""The relay's metrics. Relay processes write them to files in a shared directory
(prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR); the gateway agent's /metrics
serves their sum (agent/gateway/metrics.py), so there is one scrape target per gateway."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

RESUME_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        r = registry
        self.requests = Counter(
            "ernie_gateway_relay_requests_total",
            "Generation requests relayed, by route and outcome (ok, resumed, failed, client_gone, rejected, "
            "rate_limited, refused, overloaded)",
            ["route", "outcome"],
            registry=r,
        )
        self.resumes = Counter(
            "ernie_gateway_relay_resumes_total",
            "Continuations of a request on another instance, by why the previous attempt "
            "ended (engine_lost, error_event, abort, rescued) and how the continuation "
            "went (ok, failed, limit, not_resumable, no_instance)",
            ["reason", "outcome"],
            registry=r,
        )
        self.resume_latency = Histogram(
            "ernie_gateway_relay_resume_seconds",
            "From the end of a failed attempt to the first event of its continuation",
            buckets=RESUME_BUCKETS_S,
            registry=r,
        )
        self.unreachable = Counter(
            "ernie_gateway_relay_unreachable_attempts_total",
            "Continuations that never reached their instance (connection failed or timed out: host "
            "cut off, port closed); sent to another instance, not counted as a crash",
            registry=r,
        )
        self.tokens_replayed = Counter(
            "ernie_gateway_relay_tokens_replayed_total",
            "Generated tokens sent again as prompt of a continuation",
            registry=r,
        )
        self.in_flight = Gauge(
            "ernie_gateway_relay_requests_in_flight",
            "Requests the relay is serving",
            multiprocess_mode="livesum",
            registry=r,
        )
