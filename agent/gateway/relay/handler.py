"""One client request through the relay: attempts, resumes, the client's stream.

attempt 0: the client's request, balanced by Envoy (retries before the first byte are Envoy's)
attempt k: a continuation, sent by Envoy's stateful-session header to an instance the relay
           picked (healthy in the snapshot, not tried by this request); no Envoy retries
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from agent.gateway.relay import sse
from agent.gateway.relay.admission import Admission, AdmissionPolicy, Overloaded
from agent.gateway.relay.affinity import AFFINITY_HEADER, AffinityRecipe, affinity_key
from agent.gateway.relay.limits import NO_POLICY, KeyLimits
from agent.gateway.relay.membership import Attempt, Member, Membership, Route
from agent.gateway.relay.metrics import RelayMetrics
from agent.gateway.relay.request import CONTINUATION_PATH, ROUTES, RelayRequest, parse
from agent.gateway.relay.transcript import Signal, Transcript, error_body, error_event

log = logging.getLogger("agent.gateway.relay")

HOST_OVERRIDE_HEADER = "x-ernie-host"  # Envoy's stateful session (header based, strict)
ATTEMPT_HEADER = "x-ernie-attempt"  # "resume": the hop's route without retries
CLUSTER_HEADER = "x-ernie-cluster"  # the request's model cluster (the hop routes on it)
INSTANCE_HEADER = "x-ernie-instance"
KEY_NAME_HEADER = "x-ernie-key-name"  # Envoy's: the name of the API key that matched
# Per request (aiohttp's request mapping): headers for the response (rate limits), tokens used.
EXTRA_HEADERS = "ernie_extra_headers"
TOKENS_USED = "ernie_tokens_used"
AFFINITY = "ernie_affinity_key"
ROUTE = "ernie_route"  # where the request's model is served (membership.Route)
# Request headers that belong to one hop, not to the request.
_HOP_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "expect",
        "accept-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        HOST_OVERRIDE_HEADER,
        ATTEMPT_HEADER,
        AFFINITY_HEADER,
        CLUSTER_HEADER,
    }
)
# Response headers the relay does not pass on (its own framing, or the engine hop's session header).
_DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "date",
        "server",
        "content-encoding",
        HOST_OVERRIDE_HEADER,
    }
)


def response_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """The engine's response headers as the client should get them (x-ernie-instance among them)."""
    return {k: v for k, v in upstream.items() if k.lower() not in _DROPPED_RESPONSE_HEADERS}


SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}

# Why an attempt ended.
DONE = "done"
ENGINE_LOST = "engine_lost"  # connection reset / EOF before the final chunk (killed engine, lost host)
ERROR_EVENT = "error_event"  # the engine reported a mid-stream error
ABORT = "abort"  # vLLM aborted it (SIGTERM without drain, drain deadline)
RESCUED = "rescued"  # its instance left the snapshot and it made no progress (hung)
CRASH_LIKE = frozenset({ENGINE_LOST, ERROR_EVENT})
MAX_REFUSALS = 5  # continuations refused (instance gone between pick and send) before giving up
CLUSTER_WARMING_WAIT_S = 0.1  # before trying again a request whose model cluster Envoy does not have yet
_NO_CLUSTER = b"cluster_not_found"  # Envoy's reply details for a cluster_header naming no cluster (yet)


@dataclass(frozen=True)
class ResumePolicy:
    limit: int = 3  # continuations per request, whatever the cause
    limit_after_crash: int = 1  # ... of which after the engine died or errored under it (a prompt of death)
    wait_s: float = 10.0  # how long a continuation waits for a healthy instance to appear


# Envoy's reset reasons (in RESPONSE_CODE_DETAILS) for a connection that never opened: the request
# did not reach the engine (its host is cut off, its port closed), so it proves nothing about the request.
_NEVER_CONNECTED = (b"connection_failure", b"connection_timeout")


def unanswered(status: int, headers: Mapping[str, str], body: bytes) -> tuple[str, bool] | None:
    """(instance, reached) for a request an instance dropped before answering it, None otherwise.

    The engine hop does not retry resets (a request that crashes engines must not walk the fleet):
    Envoy answers 503 with the reset as the reply's details, and names the instance it tried.
    `reached` is False when the connection never opened: the engine never saw the request."""
    marker = b"upstream_reset_before_response_started"
    if status != 503 or marker not in body:
        return None
    reason = body[body.index(marker) + len(marker) :]
    reached = not any(r in reason for r in _NEVER_CONNECTED)
    return headers.get(INSTANCE_HEADER, ""), reached


class ClientGone(Exception):
    pass


class ClientStream:
    """The response to the client, started lazily (so that an upstream 4xx passes through as it is)."""

    def __init__(self, request: web.Request):
        self.request = request
        self.resp: web.StreamResponse | None = None
        self.events_sent = 0

    @property
    def started(self) -> bool:
        return self.resp is not None

    async def start(self, instance: str, upstream_headers: Mapping[str, str]) -> None:
        headers = {**response_headers(upstream_headers), **SSE_HEADERS}
        if instance:
            headers[INSTANCE_HEADER] = instance
        resp = web.StreamResponse(status=200, headers=headers)
        try:
            await resp.prepare(self.request)
        except (ConnectionError, aiohttp.ClientConnectionError) as e:
            raise ClientGone() from e
        self.resp = resp

    async def write(self, events: list[bytes]) -> None:
        assert self.resp is not None
        self.events_sent += len(events)
        try:
            await self.resp.write(b"".join(e + sse.EVENT_END for e in events))
        except (ConnectionError, aiohttp.ClientConnectionError, RuntimeError) as e:
            raise ClientGone() from e


class Relay:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        membership: Membership,
        metrics: RelayMetrics,
        policy: ResumePolicy,
        clock: Callable[[], float] = time.monotonic,
        limits: KeyLimits | None = None,
        affinity: AffinityRecipe | None = None,
        admission: Admission | None = None,
    ):
        self.limits = limits
        self.affinity = affinity
        self.admission = admission or Admission(AdmissionPolicy(instance_concurrency=0), membership.routable)
        self.session = session
        self.membership = membership
        self.metrics = metrics
        self.policy = policy
        self.clock = clock
        self.active = 0  # requests in flight in this process (the drain waits for 0)

    # --- entry ------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return _wrong_method(request, "POST")
        kind = ROUTES[request.path]
        raw = await request.read()
        req = parse(kind, raw)
        # Envoy sets the key's name when it checks keys; without keys a client's header means nothing
        key_name = request.headers.get(KEY_NAME_HEADER, "") if self.limits is not None else ""
        route = self.membership.route(req.body.get("model")) if req is not None else Route()
        if route.status:
            self.metrics.requests.labels(request.path, route.code).inc()
            return _refusal(route.status, route.message, "invalid_request_error", route.code, param="model")
        request[ROUTE] = route
        if self.affinity is not None and req is not None:
            request[AFFINITY] = affinity_key(self.affinity, kind, req.body, request.headers, tenant=key_name)
        policy = self.limits.policy(key_name) if self.limits is not None else NO_POLICY
        if policy.models and req is not None and (route.model or req.model) not in policy.models:
            self.metrics.requests.labels(request.path, "refused").inc()
            return _refusal(
                403,
                f"the API key {key_name!r} may not use model {req.model!r} (allowed: {', '.join(policy.models)})",
                "invalid_request_error",
                "model_not_allowed",
            )
        if policy.limited and self.limits is not None:
            decision = self.limits.windows.admit(key_name, policy)
            request[EXTRA_HEADERS] = decision.headers
            if not decision.allowed:
                self.metrics.requests.labels(request.path, "rate_limited").inc()
                return _refusal(
                    429,
                    f"rate limit reached for API key {key_name!r}: "
                    + (
                        f"{policy.requests_per_minute} requests per minute"
                        if decision.kind == "requests"
                        else f"{policy.tokens_per_minute} tokens per minute"
                    )
                    + f"; retry in {decision.retry_after_s}s",
                    decision.kind,
                    "rate_limit_exceeded",
                )
        try:
            await self.admission.acquire(key_name)
        except Overloaded as e:
            self.metrics.requests.labels(request.path, "overloaded").inc()
            busy = _refusal(503, str(e), "service_unavailable", "overloaded")
            busy.headers["retry-after"] = str(e.retry_after_s)
            return busy
        self.metrics.in_flight.inc()
        self.active += 1
        try:
            if req is None or (not req.resumable and not req.stream):
                return await self._pass_through(request, raw)
            return await self._relay(request, req)
        finally:
            self.active -= 1
            self.metrics.in_flight.dec()
            self.admission.release()
            if policy.tokens_per_minute and self.limits is not None:
                self.limits.windows.record_tokens(key_name, int(request.get(TOKENS_USED, 0)))

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models: every model with a passing instance in the snapshot, merged across
        instances (the smallest max_model_len of its instances), in the OpenAI list shape; with
        an API key limited to some models, those only."""
        if request.method != "GET":
            return _wrong_method(request, "GET")
        if not self.membership.synced:
            return web.Response(
                status=503,
                content_type="application/json",
                body=error_body("the gateway has not received its first snapshot yet: retry in a moment"),
            )
        key_name = request.headers.get(KEY_NAME_HEADER, "") if self.limits is not None else ""
        allowed = self.limits.policy(key_name).models if self.limits is not None else ()
        created = int(time.time())
        cards = []
        for model, max_len in sorted(self.membership.served().items()):
            if allowed and model not in allowed:
                continue
            card: dict[str, object] = {"id": model, "object": "model", "created": created, "owned_by": "vllm"}
            card.update(root=model, parent=None)
            if max_len:
                card["max_model_len"] = max_len
            cards.append(card)
        return web.Response(
            status=200, content_type="application/json", body=json.dumps({"object": "list", "data": cards}).encode()
        )

    def _headers(self, request: web.Request, member: Member | None) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        headers["content-type"] = "application/json"
        route: Route = request.get(ROUTE) or Route()
        if route.cluster:
            headers[CLUSTER_HEADER] = route.cluster
        if member is not None:
            headers[HOST_OVERRIDE_HEADER] = member.host_override
            headers[ATTEMPT_HEADER] = "resume"
        elif request.get(AFFINITY):
            headers[AFFINITY_HEADER] = request[AFFINITY]
        return headers

    async def _pass_through(self, request: web.Request, raw: bytes) -> web.Response:
        """Requests that cannot be resumed and wait for a whole body anyway: sent as they are. One that
        an engine dropped before answering (reset before headers: it died, or its host vanished) is
        sent once more, to another instance: a prompt of death takes at most one more engine. One
        that never reached its instance (connection failed) is sent to another, and counts no crash."""
        member: Member | None = None
        excluded: set[str] = set()
        crashes = unreachable = 0
        while True:
            async with self.session.post(request.path_qs, data=raw, headers=self._headers(request, member)) as resp:
                body = await resp.read()
                headers = response_headers(resp.headers)
            lost = unanswered(resp.status, headers, body)
            if lost is None:
                break
            instance, reached = lost
            if not reached and member is None:
                break  # Envoy has retried the connection on other instances already: its 503 stands
            if reached:
                crashes += 1
            else:  # never reached the engine: no crash, but not without end either
                unreachable += 1
                self.metrics.unreachable.inc()
            if crashes > self.policy.limit_after_crash or unreachable > MAX_REFUSALS:
                break
            excluded.add(instance)
            # nothing sent yet: no waiting
            member = self.membership.pick(excluded, request.get(AFFINITY, ""), model=_model(request))
            if member is None:
                break
        self.metrics.requests.labels(request.path, "ok" if resp.status < 400 else "rejected").inc()
        if resp.status == 200:
            request[TOKENS_USED] = _total_tokens(body)
        return web.Response(status=resp.status, body=body, headers=headers)

    # --- the relay loop ---------------------------------------------------------------------

    async def _relay(self, request: web.Request, req: RelayRequest) -> web.StreamResponse:
        t = Transcript(req)
        client = ClientStream(request)
        excluded: set[str] = set()
        refused: dict[str, str] = {}  # instance -> the snapshot version it refused in
        crash_resumes = refusals = 0
        member: Member | None = None
        failed_at: float | None = None
        last_reason = ""
        try:
            while True:
                if t.started:
                    path, body = CONTINUATION_PATH, t.continuation()
                else:
                    path, body = request.path_qs, req.upstream_body()
                attempt = Attempt(self.clock)
                outcome, early = await self._attempt(
                    request, req, t, client, attempt, path, body, member, continuing=t.started and t.resumes > 0
                )
                if failed_at is not None and outcome != "refused":
                    self.metrics.resume_latency.observe(max(attempt.last_event_at - failed_at, 0.0))
                    self.metrics.resumes.labels(last_reason, "ok" if outcome == DONE else "failed").inc()
                if early is not None:
                    self.metrics.requests.labels(request.path, "rejected").inc()
                    return early
                if outcome == DONE:
                    return await self._finish(request, req, t, client)
                # The attempt failed: continue elsewhere, within bounds. An instance that refused
                # (gone or unreachable when the request was sent; the relay's snapshot may lag
                # Envoy's) is left out until the snapshot changes; one that took it, for good.
                failed_on = attempt.instance or (member.instance_id if member is not None else "")
                if failed_on and outcome == "refused":
                    refused[failed_on] = self.membership.version
                elif failed_on:
                    excluded.add(failed_on)
                if outcome == "refused":
                    refusals += 1
                    if refusals > MAX_REFUSALS:
                        return await self._give_up(
                            request, req, t, client, "no instance accepted the request (engine hop unreachable?)"
                        )
                else:
                    last_reason, failed_at = outcome, self.clock()
                    if outcome in CRASH_LIKE:
                        crash_resumes += 1
                    t.resumes += 1
                log.info(
                    "request %s on %s ended (%s) after %d tokens; resume %d",
                    t.id or "-",
                    attempt.instance or (member.instance_id if member else "?"),
                    outcome,
                    t.generated_count(),
                    t.resumes,
                )
                why = self._why_not_resume(req, t, client, crash_resumes)
                if why:
                    self.metrics.resumes.labels(last_reason or outcome, why[0]).inc()
                    return await self._give_up(request, req, t, client, why[1])
                if req.max_tokens is not None and t.started and t.generated_count() >= req.max_tokens:
                    t.finish_reason = "length"  # every token was relayed; only the final chunk was lost
                    return await self._finish(request, req, t, client, synthesize_final=True)
                # Waiting for an instance to come (back) is worth it for an answer under way; one
                # that has not started gets its 503 at once (the fleet is down: the client retries)
                wait_s = self.policy.wait_s if t.started or client.started else 0.0
                member = await self.membership.wait_pick(
                    excluded, wait_s, request.get(AFFINITY, ""), refused, model=_model(request)
                )
                if member is None:
                    self.metrics.resumes.labels(last_reason, "no_instance").inc()
                    return await self._give_up(request, req, t, client, "no other healthy instance to continue on")
                if t.started:
                    self.metrics.tokens_replayed.inc(t.generated_count())
        except ClientGone:
            self.metrics.requests.labels(request.path, "client_gone").inc()
            return client.resp or web.Response(status=499)

    def _why_not_resume(
        self, req: RelayRequest, t: Transcript, client: ClientStream, crash_resumes: int
    ) -> tuple[str, str] | None:
        if not req.resumable and (t.started or client.events_sent):
            return "not_resumable", (
                f"the instance serving this request failed, and a request with {req.why_not} "
                "cannot be continued exactly on another instance"
            )
        if crash_resumes > self.policy.limit_after_crash:
            return "limit", (
                f"this request was cut on {crash_resumes} instances (engine died or errored): not trying another"
            )
        if t.resumes > self.policy.limit:
            return "limit", f"this request failed on {t.resumes} instances: not trying another"
        return None

    async def _attempt(
        self,
        request: web.Request,
        req: RelayRequest,
        t: Transcript,
        client: ClientStream,
        attempt: Attempt,
        path: str,
        body: bytes,
        member: Member | None,
        continuing: bool,
    ) -> tuple[str, web.StreamResponse | None]:
        """Run one upstream attempt; returns (why it ended, a response to return as it is or None)."""
        try:
            ctx = self.session.post(path, data=body, headers=self._headers(request, member))
            resp = await ctx.__aenter__()
        except (aiohttp.ClientError, OSError) as e:
            log.warning("engine hop unreachable: %s", e)
            return "refused", None
        try:
            attempt.close = resp.close
            if resp.status != 200:
                payload = await resp.read()
                headers = response_headers(resp.headers)
                lost = unanswered(resp.status, headers, payload)
                if lost is not None:
                    attempt.instance, reached = lost
                    if reached:
                        return ENGINE_LOST, None  # the engine died (or its host vanished) before answering
                    if member is not None:  # a continuation whose instance is cut off or closed: no crash
                        self.metrics.unreachable.inc()
                        return "refused", None
                    # a first attempt: Envoy has retried the connection on other instances already,
                    # so its 503 is the answer (at once, not after waiting for an instance to appear)
                if resp.status == 503 and _NO_CLUSTER in payload:
                    # a model that just appeared: its cluster is still warming in Envoy (milliseconds)
                    await asyncio.sleep(CLUSTER_WARMING_WAIT_S)
                    return "refused", None
                if client.started or member is not None and t.resumes > 0:
                    return "refused", None  # the chosen instance is gone: the caller picks another
                return "rejected", web.Response(status=resp.status, body=payload, headers=headers)
            instance = resp.headers.get(INSTANCE_HEADER, "") or (member.instance_id if member else "")
            if not t.instances:
                t.first_headers = response_headers(resp.headers)
            self.membership.track(attempt, instance)
            t.served_by(instance)
            if req.stream and not client.started:
                await client.start(instance, resp.headers)
            try:
                return await self._read(resp, req, t, client, attempt, continuing), None
            finally:
                self.membership.untrack(attempt)
        finally:
            resp.close()

    async def _read(
        self,
        resp: aiohttp.ClientResponse,
        req: RelayRequest,
        t: Transcript,
        client: ClientStream,
        attempt: Attempt,
        continuing: bool,
    ) -> str:
        splitter = sse.EventSplitter()
        on_event = t.continued if continuing else t.native
        finished = False
        try:
            async for data in resp.content.iter_any():
                attempt.last_event_at = self.clock()
                out: list[bytes] = []
                ended = ""
                for ev in splitter.feed(data):
                    payload, signal = on_event(ev)
                    if payload is not None:
                        out.append(payload)
                    if signal == Signal.FINISH:
                        finished = True
                    elif signal == Signal.DONE:
                        ended = DONE
                        break
                    elif signal == Signal.ABORT:
                        ended = ABORT
                        break
                    elif signal == Signal.ERROR:
                        ended = DONE if finished else ERROR_EVENT
                        break
                if out and req.stream:
                    await client.write(out)
                if ended:
                    return ended
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError):
            pass
        if finished:
            return DONE  # the final chunk came; only [DONE] (written by us) was lost
        return RESCUED if attempt.rescued else ENGINE_LOST

    # --- endings ----------------------------------------------------------------------------

    async def _finish(
        self,
        request: web.Request,
        req: RelayRequest,
        t: Transcript,
        client: ClientStream,
        synthesize_final: bool = False,
    ) -> web.StreamResponse:
        self.metrics.requests.labels(request.path, "resumed" if t.resumes else "ok").inc()
        request[TOKENS_USED] = t.usage()["total_tokens"]
        if not req.stream:
            headers = {**t.first_headers, "content-type": "application/json"}
            if t.instances:
                headers[INSTANCE_HEADER] = t.instances[0]
            return web.Response(status=200, body=t.response(), headers=headers)
        events = []
        if synthesize_final:
            events.append(t._client_chunk("", [], t.finish_reason, None))
        events.extend(t.closing_events())
        await client.write(events)
        resp = client.resp
        assert resp is not None  # started: write() above needs it
        await resp.write_eof()
        return resp

    async def _give_up(
        self, request: web.Request, req: RelayRequest, t: Transcript, client: ClientStream, message: str
    ) -> web.StreamResponse:
        self.metrics.requests.labels(request.path, "failed").inc()
        request[TOKENS_USED] = t.usage()["total_tokens"]
        log.warning("request %s failed: %s", t.id or "-", message)
        if not client.started:
            return web.Response(status=503, body=error_body(message), content_type="application/json")
        await client.write([error_event(message)])
        resp = client.resp
        assert resp is not None  # started: write() above needs it
        await resp.write_eof()
        return resp


def _refusal(status: int, message: str, err_type: str, code: str, param: str | None = None) -> web.Response:
    """A request the relay refuses before any engine sees it, in the OpenAI error shape."""
    body = json.dumps({"error": {"message": message, "type": err_type, "param": param, "code": code}})
    return web.Response(status=status, body=body.encode(), content_type="application/json")


def _wrong_method(request: web.Request, allowed: str) -> web.Response:
    return web.Response(
        status=405,
        headers={"allow": allowed},
        content_type="application/json",
        body=error_body(
            f"{request.method} is not allowed on {request.path}: use {allowed}", 405, "invalid_request_error"
        ),
    )


def _model(request: web.Request) -> str:
    """The model whose instances a request's continuation may go to ('' = any: no model known yet).
    Also with one model served (its route names no cluster): another may register mid-stream."""
    route: Route = request.get(ROUTE) or Route()
    return route.model


def _total_tokens(body: bytes) -> int:
    try:
        usage = json.loads(body).get("usage") or {}
        return int(usage.get("total_tokens") or 0)
    except (ValueError, TypeError, AttributeError):
        return 0


async def add_extra_headers(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp on_response_prepare: the rate-limit headers decided for this request."""
    for name, value in request.get(EXTRA_HEADERS, ()):
        response.headers[name] = value
