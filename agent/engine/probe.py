"""Probes of one engine's HTTP API: /health, /metrics (vLLM names), a 1-token canary, identity."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
REQUESTS_FINISHED = "vllm:request_success_total"  # every finish reason (stop, length, abort, ...)


@dataclass(frozen=True)
class EngineLoad:
    running: float
    waiting: float
    generation_tokens: float
    kv_cache_usage: float | None = None
    prompt_tokens: float = 0.0
    requests_finished: float = 0.0

    @property
    def requests_seen(self) -> float:
        """Requests that reached the engine so far: each is waiting, running or finished."""
        return self.requests_finished + self.running + self.waiting

    @property
    def tokens_processed(self) -> float:
        """Prefill and decode work done so far: grows whenever the engine makes progress."""
        return self.prompt_tokens + self.generation_tokens


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency_s: float
    error: str = ""
    timed_out: bool = False  # no answer within the deadline (as opposed to a bad answer)


@dataclass(frozen=True)
class Identity:
    served_model_name: str = ""
    model: str = ""
    max_model_len: int = 0
    engine_version: str = ""


def _describe(e: Exception) -> str:
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    if isinstance(e, httpx.ConnectError):
        return "connection refused"
    return f"{type(e).__name__}: {e}".strip()


class EngineProbe:
    """`api_key` gives the key the engine requires now ("" for none): every probe sends it."""

    def __init__(self, base_url: str, client: httpx.AsyncClient, api_key: Callable[[], str] = lambda: ""):
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.api_key = api_key

    def _headers(self) -> dict[str, str]:
        key = self.api_key()
        return {"authorization": f"Bearer {key}"} if key else {}

    async def health(self, timeout_s: float) -> ProbeResult:
        t0 = time.monotonic()
        try:
            r = await self.client.get(f"{self.base_url}/health", headers=self._headers(), timeout=timeout_s)
        except httpx.HTTPError as e:
            return ProbeResult(False, time.monotonic() - t0, _describe(e))
        dt = time.monotonic() - t0
        if r.status_code != 200:
            return ProbeResult(False, dt, f"HTTP {r.status_code}")
        return ProbeResult(True, dt)

    async def load(self, timeout_s: float) -> EngineLoad | None:
        try:
            r = await self.client.get(f"{self.base_url}/metrics", headers=self._headers(), timeout=timeout_s)
            r.raise_for_status()
        except httpx.HTTPError:
            return None
        return parse_load(r.text)

    async def canary(self, model: str, prompt: str, timeout_s: float) -> ProbeResult:
        """One token, greedy, hard deadline: proves the engine can actually generate."""
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        t0 = time.monotonic()
        try:
            r = await self.client.post(
                f"{self.base_url}/v1/completions", json=body, headers=self._headers(), timeout=timeout_s
            )
        except httpx.HTTPError as e:
            if isinstance(e, httpx.TimeoutException):
                return ProbeResult(False, time.monotonic() - t0, f"no token within {timeout_s:g}s", timed_out=True)
            return ProbeResult(False, time.monotonic() - t0, _describe(e))
        dt = time.monotonic() - t0
        if r.status_code == 401:
            return ProbeResult(False, dt, "HTTP 401: the engine refused the agent's API key (engine_api_key_file)")
        if r.status_code != 200:
            return ProbeResult(False, dt, f"HTTP {r.status_code}: {r.text[:120]}")
        try:
            body = r.json()
        except ValueError:
            return ProbeResult(False, dt, "answer is not JSON")
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return ProbeResult(False, dt, f"answer is not a completion: {r.text[:120]}")
        if choices[0].get("finish_reason") == "abort":
            return ProbeResult(False, dt, "generation aborted")
        return ProbeResult(True, dt)

    async def identity(self, timeout_s: float) -> Identity | None:
        try:
            r = await self.client.get(f"{self.base_url}/v1/models", headers=self._headers(), timeout=timeout_s)
            if r.status_code != 200:
                return None  # not ready, or the key refused: asked again next cycle
            models = r.json()
            first = (models.get("data") or [{}])[0]
        except (httpx.HTTPError, ValueError):
            return None
        version = ""
        try:
            v = await self.client.get(f"{self.base_url}/version", headers=self._headers(), timeout=timeout_s)
            if v.status_code == 200:
                version = str(v.json().get("version", ""))
        except (httpx.HTTPError, ValueError):
            pass
        return Identity(
            served_model_name=str(first.get("id", "")),
            model=str(first.get("root") or first.get("id", "")),
            max_model_len=int(first.get("max_model_len") or 0),
            engine_version=version,
        )


LOAD_SAMPLES = frozenset((RUNNING, WAITING, GENERATION_TOKENS, PROMPT_TOKENS, KV_CACHE_USAGE, REQUESTS_FINISHED))


def _sample_value(line: str, name_end: int) -> float | None:
    """The value of a sample line `name{labels} value [timestamp]` whose name ends at `name_end`;
    None if it is not one (another metric sharing the prefix, or malformed)."""
    rest = line[name_end:]
    if rest.startswith("{"):
        # The labels end at the first `}` outside a quoted value (values may hold `}`, `\"`, spaces).
        quoted = escaped = False
        for i, ch in enumerate(rest):
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = quoted
            elif ch == '"':
                quoted = not quoted
            elif ch == "}" and not quoted:
                rest = rest[i + 1 :]
                break
        else:
            return None
    elif not rest[:1].isspace():
        return None
    fields = rest.split()
    if not fields:
        return None
    try:
        return float(fields[0])
    except ValueError:
        return None


def parse_load(text: str) -> EngineLoad | None:
    """Sum vLLM's load gauges/counters over their labels (one engine may report several label sets).

    Reads only the six samples it needs, line by line: a full Prometheus parse of vLLM's /metrics
    (about 500 lines of histograms) held the agent's event loop for 110 ms per page at load average
    22 on 2 cores (this: 2 ms), several times a second, delaying every task on the loop (the TTL
    refresh among them) and starving its Consul writer thread of the GIL."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue  # comments (# HELP, # TYPE), other metrics
        end = len(line)
        for sep in ("{", " ", "\t"):
            i = line.find(sep)
            if 0 < i < end:
                end = i
        name = line[:end]
        if name not in LOAD_SAMPLES:
            continue
        value = _sample_value(line, end)
        if value is None:
            return None  # a sample we need is malformed: this reading proves nothing
        sums[name] = sums.get(name, 0.0) + value
    if RUNNING not in sums or GENERATION_TOKENS not in sums:
        return None
    return EngineLoad(
        running=sums[RUNNING],
        waiting=sums.get(WAITING, 0.0),
        generation_tokens=sums[GENERATION_TOKENS],
        kv_cache_usage=sums.get(KV_CACHE_USAGE),
        prompt_tokens=sums.get(PROMPT_TOKENS, 0.0),
        requests_finished=sums.get(REQUESTS_FINISHED, 0.0),
    )
