"""The SIMULATED engine's HTTP surface (Starlette, pure ASGI): vLLM's OpenAI-compatible routes plus
admin routes under /sim/ to read counters and, only when started with --allow-faults (tests and
drills), to switch faults (/sim/fault).

Generation routes are raw ASGI handlers so they control exactly when headers and each SSE chunk go
out (what the hang modes are about) and notice a client that went away.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.sim.engine import SIM_ENGINE_VERSION, ActiveRequest, SimEngine
from agent.sim.faults import FaultError, FaultMode, parse_fault
from agent.sim.metrics import METRICS_CONTENT_TYPE
from agent.sim.protocol import ApiError, Kind, error_body, parse_generation
from agent.sim.wire import full_response, role_chunk, token_chunk, usage_chunk

MAX_BODY_BYTES = 4 * 1024 * 1024
SIM_HEADER = "x-sim-engine"
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
JSON_HEADERS = [(b"content-type", b"application/json")]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class EngineHeaderMiddleware:
    """Adds `x-sim-engine: <instance name>` to every response."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.header = (SIM_HEADER.encode(), name.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


async def _read_json(receive: Receive) -> object:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "client disconnected before sending the whole body")
        body = message.get("body", b"")
        size += len(body)
        if size > MAX_BODY_BYTES:
            raise ApiError(400, f"request body larger than {MAX_BODY_BYTES} bytes", "body")
        chunks.append(body)
        if not message.get("more_body", False):
            break
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "empty request body: expected a JSON object", "body")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"invalid JSON body: {e}", "body") from None


class GenerationEndpoint:
    """POST /v1/chat/completions (kind "chat") or /v1/completions (kind "completion")."""

    def __init__(self, engine: SimEngine, kind: Kind) -> None:
        self.engine = engine
        self.kind: Kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = self.engine
        try:
            body = await _read_json(receive)
            if engine.config.crash_marker and engine.config.crash_marker in _dumps(body).decode():
                engine.crash()  # a prompt of death: the process dies before answering
            params = parse_generation(self.kind, body, engine.config.model, engine.config.max_model_len)
            if not engine.accepting:
                raise ApiError(503, "the simulated engine is shutting down and accepts no new requests")
            if engine.draw_injected_error():
                raise ApiError(500, "simulated engine failure (fault mode error_rate)")
        except ApiError as e:
            engine.count_rejected()
            engine.record_status(e.status)
            await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)
            return
        req = engine.admit(params)
        watcher = asyncio.create_task(self._watch_disconnect(receive, req))
        try:
            if params.stream:
                await self._stream(req, send)
            else:
                await self._unary(req, send)
        finally:
            watcher.cancel()
            engine.release(req)

    async def _watch_disconnect(self, receive: Receive, req: ActiveRequest) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.engine.abort(req, "client disconnected")
                return

    async def _stream(self, req: ActiveRequest, send: Send) -> None:
        p, rid, created = req.params, req.request_id, req.created
        # Like vLLM: headers go out before the first token.
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        self.engine.record_status(200)

        async def event(obj: Any) -> None:
            await send({"type": "http.response.body", "body": b"data: " + _dumps(obj) + b"\n\n", "more_body": True})

        finish_sent = False
        while (token := await self.engine.next_token(req)) is not None:
            text, token_id = token
            if req.tokens == 1 and p.kind == "chat":
                await event(role_chunk(p, rid, created))
            await event(token_chunk(p, rid, created, text, [token_id], req.finish_reason, first=req.tokens == 1))
            finish_sent = req.finish_reason is not None
        if not finish_sent:  # aborted: a last chunk with no token
            await event(token_chunk(p, rid, created, "", [], req.finish_reason, first=req.tokens == 0))
        if p.include_usage:
            await event(usage_chunk(p, rid, created, req.tokens))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _unary(self, req: ActiveRequest, send: Send) -> None:
        headers_sent = req.held  # hang_after_headers: the headers go out, then nothing
        if headers_sent:
            await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        texts, token_ids = [], []
        while (token := await self.engine.next_token(req)) is not None:
            texts.append(token[0])
            token_ids.append(token[1])
        assert req.finish_reason is not None
        body = _dumps(
            full_response(req.params, req.request_id, req.created, "".join(texts), token_ids, req.finish_reason)
        )
        if not headers_sent:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())],
                }
            )
        self.engine.record_status(200)
        await send({"type": "http.response.body", "body": body, "more_body": False})


# vLLM's --api-key guards these path prefixes only (vllm/entrypoints/serve/middleware/authenticate.py)
GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")


class ApiKeyMiddleware:
    """vLLM's --api-key check: a request to a guarded path without `Authorization: Bearer <one of
    the keys>` gets 401 {"error": "Unauthorized"}, as vLLM answers it; OPTIONS and other paths
    (/health, /metrics, /version, /sim/...) pass."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def _authorized(self, scope: Scope) -> bool:
        value = Headers(scope=scope).get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode()).digest()
        return any([hmac.compare_digest(digest, d) for d in self.digests])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") != "OPTIONS"
            and str(scope["path"]).startswith(GUARDED_PREFIXES)
            and not self._authorized(scope)
        ):
            await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _json_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def build_app(
    engine: SimEngine,
    on_crash: Callable[[], None] | None = None,
    allow_faults: bool = False,
    api_keys: tuple[str, ...] = (),
) -> Starlette:
    """The ASGI app around `engine`. /sim/fault exists only with `allow_faults` (anyone who reaches
    it can crash or hang the engine). With `api_keys`, vLLM's --api-key check (ApiKeyMiddleware).
    `on_crash` runs after answering POST /sim/fault {"mode": "crash"} (default: exit the process at
    once, like a crashed engine)."""
    crash = on_crash or engine.crash
    cfg = engine.config

    async def health(_: Request) -> Response:
        return Response(status_code=200 if engine.accepting else 503)

    async def version(_: Request) -> Response:
        return JSONResponse({"version": SIM_ENGINE_VERSION, "engine": "simulated", "name": cfg.name})

    async def models(_: Request) -> Response:
        card = {
            "id": cfg.model,
            "object": "model",
            "created": 0,
            "owned_by": "simulated",
            "root": cfg.model,
            "parent": None,
            "max_model_len": cfg.max_model_len,
            "permission": [],
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(_: Request) -> Response:
        return Response(engine.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def get_fault(_: Request) -> Response:
        return JSONResponse(engine.fault.to_json())

    async def post_fault(request: Request) -> Response:
        try:
            fault = parse_fault(json.loads(await request.body()))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return _json_error(400, f"invalid JSON body: {e}", "body")
        except FaultError as e:
            return _json_error(400, str(e), "mode")
        if fault.mode is FaultMode.CRASH:
            return JSONResponse(fault.to_json(), background=BackgroundTask(crash))
        engine.set_fault(fault)
        return JSONResponse(fault.to_json())

    async def stats(_: Request) -> Response:
        return JSONResponse(engine.stats())

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        return _json_error(
            status,
            f"{request.method} {request.url.path}: "
            f"{'no such route' if status == 404 else 'method not allowed'} "
            "on this simulated engine",
        )

    routes = [
        Route("/v1/chat/completions", GenerationEndpoint(engine, "chat"), methods=["POST"]),
        Route("/v1/completions", GenerationEndpoint(engine, "completion"), methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
        Route("/version", version),
        Route("/metrics", metrics),
        Route("/sim/stats", stats),
    ]
    if allow_faults:
        routes += [Route("/sim/fault", get_fault, methods=["GET"]), Route("/sim/fault", post_fault, methods=["POST"])]
    return Starlette(
        routes=routes,
        middleware=[Middleware(EngineHeaderMiddleware, name=cfg.name)]
        + ([Middleware(ApiKeyMiddleware, keys=tuple(api_keys))] if api_keys else []),
        exception_handlers={404: not_found, 405: not_found},
    )
