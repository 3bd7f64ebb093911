"""The engine agent's HTTP API: /live, /ready[/<id>], /instances, /metrics, POST /drain/<id>."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.catalog.base import VerdictState
from agent.engine.instance import InstanceController
from agent.engine.metrics import EngineAgentMetrics


def create_app(controllers: dict[str, InstanceController], metrics: EngineAgentMetrics, node: str) -> FastAPI:
    app = FastAPI(title="ernie-mesh engine agent", docs_url=None, redoc_url=None, openapi_url=None)

    def unknown(instance_id: str) -> JSONResponse:
        return JSONResponse(
            {"error": f"no instance {instance_id!r} on this agent", "instances": sorted(controllers)}, status_code=404
        )

    @app.get("/live")
    def live() -> dict[str, Any]:
        return {"status": "alive", "node": node}

    @app.get("/ready")
    def ready_all() -> JSONResponse:
        states = {i: c.verdict.state.value for i, c in controllers.items()}
        ok = any(s == VerdictState.PASSING.value for s in states.values())
        return JSONResponse({"ready": ok, "instances": states}, status_code=200 if ok else 503)

    @app.get("/ready/{instance_id}")
    def ready(instance_id: str) -> JSONResponse:
        c = controllers.get(instance_id)
        if c is None:
            return unknown(instance_id)
        ok = c.verdict.state is VerdictState.PASSING and not c.drained
        return JSONResponse(c.describe(), status_code=200 if ok else 503)

    @app.get("/instances")
    def instances() -> dict[str, Any]:
        return {"node": node, "instances": [c.describe() for c in controllers.values()]}

    @app.post("/drain/{instance_id}")
    async def drain(instance_id: str) -> JSONResponse:
        c = controllers.get(instance_id)
        if c is None:
            return unknown(instance_id)
        c.start_drain()
        return JSONResponse(c.describe(), status_code=202)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
