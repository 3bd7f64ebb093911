"""A small client of Prometheus' HTTP API (/api/v1/query, /api/v1/query_range): what the dashboard
and `ernie-mesh top` read. Any Prometheus that scrapes the mesh (docs/metrics.md) will do."""

from __future__ import annotations

import math
from typing import Any

import httpx

TIMEOUT_S = 5.0


class PrometheusError(Exception):
    """Prometheus unreachable or the query refused; the message says which."""


def _number(text: str) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


class Prometheus:
    def __init__(self, url: str, client: httpx.Client | None = None, timeout_s: float = TIMEOUT_S):
        self.url = url.rstrip("/")
        self.client = client or httpx.Client(timeout=timeout_s)

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        try:
            r = self.client.get(f"{self.url}{path}", params=params)
        except httpx.HTTPError as e:
            raise PrometheusError(f"Prometheus at {self.url} unreachable: {e}") from None
        try:
            body = r.json()
        except ValueError:
            raise PrometheusError(f"Prometheus at {self.url} answered {r.status_code} without JSON") from None
        if body.get("status") != "success":
            raise PrometheusError(f"Prometheus refused {params.get('query', '')!r}: {body.get('error', r.text)}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) per series; NaN and infinite values are left out."""
        data = self._get("/api/v1/query", {"query": expr})
        out = []
        for s in data.get("result", []) if data.get("resultType") == "vector" else []:
            v = _number(s["value"][1])
            if v is not None:
                out.append((s["metric"], v))
        return out

    def query_range(
        self, expr: str, start: float, end: float, step_s: float
    ) -> list[tuple[dict[str, str], list[list[Any]]]]:
        """A range query: (labels, [[t, value or None], ...]) per series."""
        data = self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step_s})
        return [(s["metric"], [[float(t), _number(v)] for t, v in s["values"]]) for s in data.get("result", [])]

    def ready(self) -> bool:
        try:
            return self.client.get(f"{self.url}/-/ready").status_code == 200
        except httpx.HTTPError:
            return False
