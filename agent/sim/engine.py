"""The SIMULATED engine's core: requests in flight, token pacing, faults, shutdown, counters.

Pure asyncio, no threads: each request is paced by timers on the event loop, and every state
change (fault switched, shutdown, client gone, slot freed) wakes the requests it concerns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import Counter as Tally
from dataclasses import dataclass
from typing import Any

from agent.sim.faults import ErrorDraw, Fault, FaultMode
from agent.sim.metrics import SimMetrics
from agent.sim.prefix_cache import DEFAULT_BLOCK_SIZE, DEFAULT_CAPACITY_BLOCKS, Lookup, PrefixCache
from agent.sim.protocol import GenerationParams

log = logging.getLogger(__name__)

DEFAULT_TOKEN_DELAY_MS = 20.0
# Prefill time per prompt token not found in the prefix cache, on top of the first token's token
# delay: a 10-token prompt's first token comes 1 ms later than the others' delay, a cold 1,300-token
# system prompt's 130 ms later (cached, ~0).
DEFAULT_PREFILL_MS_PER_TOKEN = 0.1
DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_MAX_NUM_SEQS = 256
KV_CACHE_CAPACITY_TOKENS = 16_384
CRASH_EXIT_CODE = 1
SIM_ENGINE_VERSION = "0.0.0+simulated"


@dataclass(frozen=True)
class EngineConfig:
    name: str
    model: str = "sim-model"
    token_delay_ms: float = DEFAULT_TOKEN_DELAY_MS
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    crash_marker: str = ""  # a request whose body contains it crashes the engine (a prompt of death)
    prefix_cache_blocks: int = DEFAULT_CAPACITY_BLOCKS  # 0: no prefix caching
    block_size: int = DEFAULT_BLOCK_SIZE
    prefill_ms_per_token: float = DEFAULT_PREFILL_MS_PER_TOKEN


class ActiveRequest:
    """One generation in flight. `next_token` is driven by exactly one handler task."""

    def __init__(self, params: GenerationParams, started_s: float, held: bool) -> None:
        prefix = "chatcmpl" if params.kind == "chat" else "cmpl"
        self.params = params
        self.request_id = f"{prefix}-sim-{uuid.uuid4().hex[:16]}"
        self.created = int(time.time())
        self.started_s = started_s
        self.last_token_s: float | None = None
        self.held = held  # arrived under hang_after_headers: stalls while that mode lasts
        self.planned_tokens, self.planned_finish = params.plan()
        self.tokens = 0
        self.finish_reason: str | None = None
        self.abort_reason: str | None = None
        self.lookup: Lookup | None = None  # the prefix cache's answer, once admitted to run
        self._wakeup: asyncio.Future[None] | None = None

    async def sleep(self, delay_s: float | None) -> None:
        """Sleep `delay_s` (None: until woken); `wake()` ends the sleep early."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(delay_s, _resolve, fut) if delay_s is not None else None
        self._wakeup = fut
        try:
            await fut
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    def wake(self) -> None:
        if self._wakeup is not None:
            _resolve(self._wakeup)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SimEngine:
    def __init__(self, config: EngineConfig, fault: Fault | None = None) -> None:
        self.config = config
        self._fault = fault or Fault()
        self._errors = ErrorDraw()
        self._waiting: set[ActiveRequest] = set()
        self._running: set[ActiveRequest] = set()
        self._shutting_down = False
        self._status = Tally[str]()
        self._requests_total = 0
        self._completed = 0
        self._aborted = 0
        self._tokens_total = 0
        self.prefix_cache = PrefixCache(config.prefix_cache_blocks, config.block_size)
        self.metrics = SimMetrics(
            config.model,
            running=lambda: len(self._running),
            waiting=lambda: len(self._waiting),
            kv_cache_usage=self._kv_cache_usage,
        )

    # --- faults -----------------------------------------------------------------------------
    @property
    def fault(self) -> Fault:
        return self._fault

    def set_fault(self, fault: Fault) -> None:
        """Switch the fault mode. `crash` is not handled here: the caller exits the process."""
        if fault != self._fault:
            log.warning("simulated engine %s: fault %s -> %s", self.config.name, self._fault.to_json(), fault.to_json())
        self._fault = fault
        self._errors.reset()
        self._wake_all()

    def draw_injected_error(self) -> bool:
        return self._fault.mode is FaultMode.ERROR_RATE and self._errors.draw(self._fault.error_rate)

    def crash(self) -> None:
        log.error("simulated engine %s: fault crash -> exiting with code %d", self.config.name, CRASH_EXIT_CODE)
        logging.shutdown()
        os._exit(CRASH_EXIT_CODE)

    # --- requests -----------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return not self._shutting_down

    def admit(self, params: GenerationParams) -> ActiveRequest:
        req = ActiveRequest(
            params, asyncio.get_running_loop().time(), held=self._fault.mode is FaultMode.HANG_AFTER_HEADERS
        )
        self._requests_total += 1
        self._waiting.add(req)
        if self._shutting_down:
            req.abort_reason = "shutdown"
        return req

    def record_status(self, status: int) -> None:
        self._status[str(status)] += 1

    def count_rejected(self) -> None:
        """A generation request answered before admission (400/404/500/503)."""
        self._requests_total += 1

    async def next_token(self, req: ActiveRequest) -> tuple[str, int] | None:
        """(text, token ID) of the next token, after the token delay; None once finished or aborted.

        The last planned token finishes the request at once (finish_reason is set when it returns), so
        its chunk carries the finish_reason, as vLLM's does."""
        if req.finish_reason is not None:
            return None
        if req.tokens >= req.planned_tokens:
            self._finish(req, req.planned_finish)
            return None
        loop = asyncio.get_running_loop()
        while req in self._waiting:
            if req.abort_reason is not None:
                self._finish(req, "abort")
                return None
            if len(self._running) < self.config.max_num_seqs:
                self._waiting.discard(req)
                self._running.add(req)
                self._look_up_prefix(req)
                break
            await req.sleep(None)
        deadline_s = loop.time() + self._token_delay_s(req)
        while True:
            if req.abort_reason is not None:
                self._finish(req, "abort")
                return None
            if self._stalled(req):
                await req.sleep(None)
                deadline_s = loop.time() + self._token_delay_s(req)
                continue
            remaining_s = deadline_s - loop.time()
            if remaining_s <= 0:
                break
            await req.sleep(remaining_s)
        now_s = loop.time()
        if req.last_token_s is None:
            # Like vLLM: the prompt counts as processed when its prefill is done (the first token),
            # so a hung engine shows no progress at all.
            self.metrics.prompt_tokens.inc(req.params.prompt_tokens)
            self.metrics.ttft_s.observe(now_s - req.started_s)
            self.prefix_cache.insert(req.params.prompt.token_ids, self._prompt_hashes(req))
        else:
            self.metrics.itl_s.observe(now_s - req.last_token_s)
        req.last_token_s = now_s
        token = req.params.token(req.tokens)
        req.tokens += 1
        self._tokens_total += 1
        self.metrics.generation_tokens.inc()
        if req.tokens >= req.planned_tokens:
            self._finish(req, req.planned_finish)
        return token

    def abort(self, req: ActiveRequest, reason: str) -> None:
        if req.finish_reason is None and req.abort_reason is None:
            req.abort_reason = reason
            req.wake()

    def release(self, req: ActiveRequest) -> None:
        """The handler is done with `req` (finished, failed or its client gone)."""
        if req.finish_reason is None:
            self._finish(req, "abort")
        if req.last_token_s is not None and req in self._running:
            self.prefix_cache.insert(self._computed_ids(req), self._prompt_hashes(req))
        freed = req in self._running
        self._waiting.discard(req)
        self._running.discard(req)
        if freed:
            for other in list(self._waiting):
                other.wake()

    def _finish(self, req: ActiveRequest, reason: str) -> None:
        req.finish_reason = reason
        if reason == "abort":
            self._aborted += 1
            log.info(
                "simulated engine %s: request %s aborted (%s) after %d tokens",
                self.config.name,
                req.request_id,
                req.abort_reason or "handler gone",
                req.tokens,
            )
        else:
            self._completed += 1
        self.metrics.request_finished(reason)
        self.metrics.e2e_s.observe(asyncio.get_running_loop().time() - req.started_s)

    def _stalled(self, req: ActiveRequest) -> bool:
        mode = self._fault.mode
        return mode is FaultMode.HANG or (req.held and mode is FaultMode.HANG_AFTER_HEADERS)

    def _token_delay_s(self, req: ActiveRequest) -> float:
        """The wait for `req`'s next token: the token delay, and for its first token also the prefill
        of the prompt tokens the prefix cache did not have; all of it times the slow factor."""
        factor = self._fault.slow_factor if self._fault.mode is FaultMode.SLOW else 1.0
        delay_ms = self.config.token_delay_ms
        if req.last_token_s is None and req.lookup is not None:
            delay_ms += req.lookup.uncached_tokens * self.config.prefill_ms_per_token
        return delay_ms * factor / 1000.0

    def _look_up_prefix(self, req: ActiveRequest) -> None:
        """At admission to run, as vLLM's scheduler: find the cached prefix, count the lookup."""
        cache = self.prefix_cache
        req.lookup = cache.lookup(req.params.prompt.token_ids)
        if cache.enabled:
            self.metrics.prefix_cache_queries.inc(req.lookup.prompt_tokens)
            self.metrics.prefix_cache_hits.inc(req.lookup.cached_tokens)

    @staticmethod
    def _prompt_hashes(req: ActiveRequest) -> tuple[bytes, ...]:
        return req.lookup.block_hashes if req.lookup is not None else ()

    @staticmethod
    def _computed_ids(req: ActiveRequest) -> list[int]:
        """The tokens whose KV `req` has computed: its prompt and every generated token but the last
        (sampled, never fed back), as the blocks vLLM keeps cached after a request."""
        generated = [req.params.token(i)[1] for i in range(req.tokens - 1)]
        return [*req.params.prompt.token_ids, *generated]

    def _kv_cache_usage(self) -> float:
        used = sum(r.params.prompt_tokens + r.tokens for r in self._running)
        return min(1.0, used / KV_CACHE_CAPACITY_TOKENS)

    def _wake_all(self) -> None:
        for req in list(self._running) + list(self._waiting):
            req.wake()

    # --- shutdown -----------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Refuse new requests from now on (in-flight ones continue)."""
        self._shutting_down = True

    def abort_all(self, reason: str) -> int:
        """Abort everything in flight (vLLM's SIGTERM with --shutdown-timeout 0); returns the count."""
        self._shutting_down = True
        victims = [r for r in list(self._running) + list(self._waiting) if r.finish_reason is None]
        for req in victims:
            self.abort(req, reason)
        return len(victims)

    @property
    def in_flight(self) -> int:
        return len(self._running) + len(self._waiting)

    def stats(self) -> dict[str, Any]:
        return {
            "engine": "simulated",
            "name": self.config.name,
            "model": self.config.model,
            "fault": self._fault.to_json(),
            "requests_total": self._requests_total,
            "in_flight": self.in_flight,
            "running": len(self._running),
            "waiting": len(self._waiting),
            "completed": self._completed,
            "aborted": self._aborted,
            "by_status": dict(sorted(self._status.items())),
            "generation_tokens_total": self._tokens_total,
            "prefix_cache": self.prefix_cache.stats(),
            "shutting_down": self._shutting_down,
        }
