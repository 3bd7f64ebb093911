"""The engine agent's HTTP API: /live, /ready[/<id>], /instances, /metrics, POST /drain/<id>.

The reads are open (nothing secret in them); POST /drain/<id> needs `Authorization: Bearer
<token>`, the first line of control_token_file, read at each request (a new token works at once).
Without a token file configured, it is refused: the agent's SIGTERM drains every instance."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.catalog.base import VerdictState
from agent.config import ConfigError
from agent.engine.instance import InstanceController
from agent.engine.metrics import EngineAgentMetrics
from agent.secret_files import read_secret

log = logging.getLogger(__name__)

NO_TOKEN = (
    "POST /drain is off on this agent: no control_token_file is configured (set one, 0600, and send its "
    "token as Authorization: Bearer; stopping the agent with SIGTERM drains every instance)"
)
BAD_TOKEN = "POST /drain needs the agent's control token: Authorization: Bearer <token> (ernie-mesh drain --token-file)"


def bearer(request: Request) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def create_app(
    controllers: dict[str, InstanceController],
    metrics: EngineAgentMetrics,
    node: str,
    control_token_file: str = "",
) -> FastAPI:
    app = FastAPI(title="ernie-mesh engine agent", docs_url=None, redoc_url=None, openapi_url=None)

    def refused(request: Request) -> JSONResponse | None:
        """None if the request carries the control token, else the answer to give."""
        if not control_token_file:
            return JSONResponse({"error": NO_TOKEN}, status_code=403)
        try:
            token = read_secret(control_token_file, "control_token_file")
        except ConfigError as e:
            log.error("POST %s refused: %s", request.url.path, e)
            return JSONResponse({"error": f"the agent cannot read its control token: {e}"}, status_code=503)
        if not hmac.compare_digest(bearer(request).encode(), token.encode()):
            client = request.client.host if request.client else "?"
            log.warning("POST %s from %s refused: missing or wrong control token", request.url.path, client)
            return JSONResponse({"error": BAD_TOKEN}, status_code=401, headers={"www-authenticate": "Bearer"})
        return None

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
    async def drain(instance_id: str, request: Request) -> JSONResponse:
        answer = refused(request)
        if answer is not None:
            return answer
        c = controllers.get(instance_id)
        if c is None:
            return unknown(instance_id)
        c.start_drain()
        return JSONResponse(c.describe(), status_code=202)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
