"""How many instances of each model are healthy, as the mesh decides it: Consul's health of the
engine service (each engine agent's verdict is its TTL check; the gateways route to exactly the
passing ones). Read at each chat start, never cached: a new chat after an instance died shows it.

Healthy = every check of the instance passing (its own and its node's), as Consul's `?passing`
and its DNS; a draining instance (warning) and a starting or dead one (critical) are not. The model
of an instance is its `served_model_name` meta (the name /v1/models lists), else `model`.
Read `stale` (any Consul server answers from its own state, as the gateways read it). Anonymous
reads are enough where the catalog is readable without a token (`make up`, the Ansible `dns`
policy); ERNIE_MESH_CONSUL_TOKEN_FILE otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ModelHealth:
    healthy: int
    total: int


@dataclass
class Census:
    by_model: dict[str, ModelHealth] = field(default_factory=dict)
    error: str = ""  # '' when Consul answered

    def of(self, model: str) -> ModelHealth:
        return self.by_model.get(model, ModelHealth(0, 0))

    def describe(self, model: str) -> str:
        """'2 of 2 instances healthy' (Markdown), or why it is not known."""
        if self.error:
            return f"how many instances are healthy is unknown ({self.error})"
        h = self.of(model)
        if h.total == 0:
            return "**no instance** of it is in the mesh now (none registered in Consul)"
        if h.healthy == 0:
            return f"**none of its {h.total} instance{'s' if h.total != 1 else ''} is healthy** right now"
        return f"**{h.healthy} of {h.total}** instance{'s' if h.total != 1 else ''} healthy"


def census_of(nodes: list[dict[str, Any]]) -> dict[str, ModelHealth]:
    """Consul's /v1/health/service/<service> answer -> model -> healthy and total instances."""
    healthy: dict[str, int] = {}
    total: dict[str, int] = {}
    for node in nodes:
        svc = node.get("Service") or {}
        meta = svc.get("Meta") or {}
        model = meta.get("served_model_name") or meta.get("model") or ""
        checks = node.get("Checks") or []
        total[model] = total.get(model, 0) + 1
        if checks and all(c.get("Status") == "passing" for c in checks):
            healthy[model] = healthy.get(model, 0) + 1
    return {m: ModelHealth(healthy.get(m, 0), n) for m, n in total.items()}


async def read_census(consul_url: str, service: str, token: str = "", timeout_s: float = TIMEOUT_S) -> Census:
    """The census now; never raises (an unreachable or refusing Consul is the census' `error`)."""
    headers = {"X-Consul-Token": token} if token else {}
    url = f"{consul_url}/v1/health/service/{service}"
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            r = await client.get(url, params={"stale": "1"}, headers=headers)
    except httpx.HTTPError as e:
        return Census(error=f"Consul at {consul_url} unreachable: {type(e).__name__}")
    if r.status_code == 403:
        return Census(
            error=f"Consul at {consul_url} refused to read the catalog (403): set ERNIE_MESH_CONSUL_TOKEN_FILE "
            "to a token with service and node read"
        )
    if r.status_code != 200:
        return Census(error=f"Consul at {consul_url} answered HTTP {r.status_code}")
    try:
        nodes = r.json()
    except ValueError:
        return Census(error=f"Consul at {consul_url} answered something that is not JSON")
    if not isinstance(nodes, list):
        return Census(error=f"Consul at {consul_url} answered an unexpected shape")
    return Census(census_of(nodes))
