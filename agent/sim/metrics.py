"""Prometheus metrics of the SIMULATED engine under vLLM's names, in a registry of its own
(several simulated engines may live in one test process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Bucket bounds as vLLM declares them.
TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS_S = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS_S = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class SimMetrics:
    """vLLM-named metrics; the gauges read the engine's live state when scraped."""

    def __init__(
        self,
        model_name: str,
        running: Callable[[], float],
        waiting: Callable[[], float],
        kv_cache_usage: Callable[[], float],
    ) -> None:
        self.registry = CollectorRegistry()
        label = ["model_name"]
        r = self.registry
        Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", label, registry=r).labels(
            model_name
        ).set_function(running)
        Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", label, registry=r).labels(
            model_name
        ).set_function(waiting)
        Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", label, registry=r).labels(
            model_name
        ).set_function(kv_cache_usage)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", label, registry=r
        ).labels(model_name)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", label, registry=r
        ).labels(model_name)
        # In tokens, as vLLM 0.32 counts them (vllm/v1/metrics/loggers.py): every prompt token looked
        # up, and of those the ones found cached.
        self.prefix_cache_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            label,
            registry=r,
        ).labels(model_name)
        self.prefix_cache_hits = Counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", label, registry=r
        ).labels(model_name)
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self._model_name = model_name
        self.ttft_s = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            label,
            buckets=TTFT_BUCKETS_S,
            registry=r,
        ).labels(model_name)
        self.itl_s = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            label,
            buckets=ITL_BUCKETS_S,
            registry=r,
        ).labels(model_name)
        self.e2e_s = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            label,
            buckets=E2E_BUCKETS_S,
            registry=r,
        ).labels(model_name)

    def request_finished(self, finished_reason: str) -> None:
        self._success.labels(self._model_name, finished_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
