"""Steady closed-loop load through the official `openai` client, with every outcome classified.

Each of `concurrency` workers sends one request after the other (a mix of streaming and
non-streaming chat completions with `ignore_eos` and a fixed `max_tokens`, so a short answer is
detectable) and records what a user would see:

  failed     an exception before any content, or a non-2xx status
  truncated  a 200 whose answer is incomplete: a stream without its final chunk (finish_reason and
             usage), finish_reason "abort" (vLLM's SIGTERM), fewer tokens than asked, or a stream
             cut after content had arrived
  ok         everything else

The client is created with max_retries=0: the drill measures the serving system, not the client's
retry loop (which would hide failures of either system) - except where the client's own behaviour
is the point (the loss of a gateway host: LoadConfig.max_retries, and a read timeout that notices
a host that went silent). Each result records the gateway address its last attempt was sent to
(`server`) and how many attempts it took.

`python -m bench.load --base-url URL --out results.jsonl ...` runs the same load as a process of its
own (in another network namespace, with that namespace's resolver), one JSON line per request.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam
from bench.keys import BENCH_API_KEY

PROMPT = "Count slowly from one to one hundred."
STALLED_FACTOR = 5.0


@dataclass(frozen=True)
class LoadConfig:
    base_url: str  # e.g. http://127.0.0.1:8080 (without /v1)
    model: str
    concurrency: int = 8
    stream_ratio: float = 0.5  # fraction of requests that stream
    max_tokens: int = 32
    request_timeout_s: float = 60.0
    prompt: str = PROMPT
    api_key: str = BENCH_API_KEY  # the benchmark gateways' (the baseline and engines ignore it)
    max_retries: int = 0  # the openai client's own retries (connection errors, timeouts, 5xx)
    connect_timeout_s: float = 5.0
    read_timeout_s: float | None = None  # between two reads; None: request_timeout_s
    max_connections: int = 4  # per client (1: every attempt's gateway is the one its connection goes to)


@dataclass
class Result:
    started: float  # wall clock (time.time), comparable across processes
    latency_s: float
    stream: bool
    outcome: str  # ok | failed | truncated
    ttft_s: float | None = None
    tokens: int = 0
    finish_reason: str | None = None
    error: str = ""
    kind: str = ""  # short category of a not-ok outcome (for counting)
    max_gap_s: float = 0.0  # a stream's longest silence (from the request to its first event included)
    # "ip:port" each attempt's request was sent to, in order (the client's retries included)
    servers: list[str] = field(default_factory=list)
    worker: int = -1  # which client (LoadGenerator thread) sent it

    @property
    def ended(self) -> float:
        return self.started + self.latency_s


def _classify_error(e: BaseException) -> str:
    if isinstance(e, openai.APIStatusError):
        return f"HTTP {e.status_code}: {str(e)[:160]}"
    return f"{type(e).__name__}: {str(e)[:160]}"


def _kind(e: BaseException) -> str:
    return f"HTTP {e.status_code}" if isinstance(e, openai.APIStatusError) else type(e).__name__


def one_request(client: openai.OpenAI, cfg: LoadConfig, stream: bool, session: str = "") -> Result:
    """One request; `session` (x-session-id) makes it one user's conversation: the load's clients
    are many users, spread by the gateway's affinity routing as many users would be."""
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": cfg.prompt}]
    ask = dict(
        model=cfg.model,
        messages=messages,
        max_tokens=cfg.max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
        extra_headers={"x-session-id": session} if session else None,
    )
    t0_wall, t0 = time.time(), time.perf_counter()
    if not stream:
        try:
            r = client.chat.completions.create(**ask)  # type: ignore[call-overload]
        except Exception as e:  # noqa: BLE001 - every client-visible error is an outcome to count
            return Result(t0_wall, time.perf_counter() - t0, False, "failed", error=_classify_error(e), kind=_kind(e))
        latency = time.perf_counter() - t0
        finish = r.choices[0].finish_reason if r.choices else None
        tokens = r.usage.completion_tokens if r.usage else 0
        full = finish == "length" and tokens >= cfg.max_tokens
        return Result(
            t0_wall,
            latency,
            False,
            "ok" if full else "truncated",
            tokens=tokens,
            finish_reason=finish,
            error="" if full else f"finish_reason={finish} tokens={tokens}",
            kind="" if full else f"finish_reason {finish}",
        )
    ttft = None
    finish = None
    usage_tokens = None
    chunks = 0
    last = t0
    max_gap = 0.0
    try:
        events = client.chat.completions.create(  # type: ignore[call-overload]
            **ask,
            stream=True,
            stream_options={"include_usage": True},
        )
        for ev in events:
            now = time.perf_counter()
            max_gap, last = max(max_gap, now - last), now
            if ev.choices:
                c = ev.choices[0]
                if c.delta and c.delta.content:
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                if c.finish_reason:
                    finish = c.finish_reason
            if ev.usage is not None:
                usage_tokens = ev.usage.completion_tokens
    except Exception as e:  # noqa: BLE001
        latency = time.perf_counter() - t0
        outcome = "truncated" if chunks else "failed"
        return Result(
            t0_wall,
            latency,
            True,
            outcome,
            ttft_s=ttft,
            tokens=chunks,
            finish_reason=finish,
            error=_classify_error(e),
            kind=("stream cut: " if chunks else "") + _kind(e),
        )
    latency = time.perf_counter() - t0
    tokens = usage_tokens if usage_tokens is not None else chunks
    full = finish == "length" and usage_tokens is not None and usage_tokens >= cfg.max_tokens
    return Result(
        t0_wall,
        latency,
        True,
        "ok" if full else "truncated",
        ttft_s=ttft,
        tokens=tokens,
        finish_reason=finish,
        max_gap_s=max_gap,
        error=""
        if full
        else f"stream ended: finish_reason={finish} usage_tokens={usage_tokens} content_chunks={chunks}",
        kind="" if full else f"stream ended, finish_reason {finish}",
    )


class LoadGenerator:
    """`concurrency` threads, each with its own client and connection pool, until stop()."""

    def __init__(self, cfg: LoadConfig, on_result: Callable[[Result], None] | None = None):
        self.cfg = cfg
        self.on_result = on_result
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started_at: float | None = None
        self.stopped_at: float | None = None

    def start(self) -> LoadGenerator:
        self.started_at = time.time()
        for i in range(self.cfg.concurrency):
            t = threading.Thread(target=self._worker, args=(i,), daemon=True, name=f"load-{i}")
            t.start()
            self._threads.append(t)
        return self

    def _worker(self, index: int) -> None:
        tracer = _Tracer()
        timeout = (
            httpx.Timeout(self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s, read=self.cfg.read_timeout_s)
            if self.cfg.read_timeout_s is not None
            else httpx.Timeout(self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s)
        )
        http = httpx.Client(
            limits=httpx.Limits(
                max_connections=self.cfg.max_connections,
                max_keepalive_connections=min(2, self.cfg.max_connections),
            ),
            timeout=timeout,
            event_hooks={"request": [tracer.install]},
        )
        client = openai.OpenAI(
            base_url=f"{self.cfg.base_url}/v1",
            api_key=self.cfg.api_key,
            max_retries=self.cfg.max_retries,
            timeout=timeout,  # type: ignore[arg-type]  # openai's httpx2 alias of httpx.Timeout
            # openai types this as httpx2.Client, but accepts (and checks for) an httpx.Client
            http_client=http,  # type: ignore[arg-type]
        )
        n = 0
        # Deterministic mix: worker i, request n streams when the running fraction is below the ratio,
        # offset per worker so the mix holds at every moment, not only on average.
        while not self._stop.is_set():
            k = n * self.cfg.concurrency + index
            stream = math.floor((k + 1) * self.cfg.stream_ratio) > math.floor(k * self.cfg.stream_ratio)
            tracer.sent.clear()
            res = one_request(client, self.cfg, stream, session=f"client{index}-{n}")
            res.worker, res.servers = index, list(tracer.sent)
            with self._lock:
                self.results.append(res)
            if self.on_result is not None:
                self.on_result(res)
            n += 1
            if res.outcome == "failed" and res.latency_s < 0.05:
                self._stop.wait(0.05)  # an instant error (nothing listening): do not spin the CPU
        http.close()

    def stop(self, wait_s: float | None = None) -> None:
        """Stop issuing requests; wait up to `wait_s` (default: the request timeout) for those in flight."""
        self._stop.set()
        self.stopped_at = time.time()
        deadline = time.monotonic() + (self.cfg.request_timeout_s + 5 if wait_s is None else wait_s)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    @property
    def in_flight_threads(self) -> int:
        return sum(1 for t in self._threads if t.is_alive())

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)


class _Tracer:
    """httpcore's trace hook on every request of one client: which address each attempt went to.
    With max_connections=1 the attempt goes over the client's one connection, the last one made."""

    def __init__(self) -> None:
        self.peer = ""
        self.sent: list[str] = []

    def install(self, request: httpx.Request) -> None:
        request.extensions["trace"] = self.trace

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            addr = info["return_value"].get_extra_info("server_addr")
            self.peer = f"{addr[0]}:{addr[1]}" if addr else ""
        elif event.endswith("send_request_headers.started"):
            self.sent.append(self.peer)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) or None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


@dataclass
class LoadSummary:
    requests: int
    ok: int
    failed: int
    truncated: int
    p50_ms: float | None
    p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    rps: float
    stalled: int = 0  # ok requests that took more than STALLED_FACTOR x the median
    # The longest a user waited on one request beyond the usual: a stream's longest silence, or a
    # non-streaming request's latency minus the median non-streaming latency.
    longest_wait_s: float | None = None
    errors: dict[str, int] = field(default_factory=dict)


def summarize(results: list[Result], seconds: float) -> LoadSummary:
    lat = [r.latency_s * 1000 for r in results if r.outcome == "ok"]
    ttft = [r.ttft_s * 1000 for r in results if r.outcome == "ok" and r.ttft_s is not None]
    errors: dict[str, int] = {}
    for r in results:
        if r.outcome != "ok":
            key = f"{r.outcome}: {r.kind or '?'}"
            errors[key] = errors.get(key, 0) + 1

    def rnd(v: float | None) -> float | None:
        return None if v is None else round(v, 1)

    ok = sum(1 for r in results if r.outcome == "ok")
    unary = [r.latency_s for r in results if r.outcome == "ok" and not r.stream]
    unary_p50 = percentile(unary, 50) or 0.0
    waits = [r.max_gap_s if r.stream else r.latency_s - unary_p50 for r in results if r.outcome == "ok"]
    p50 = percentile(lat, 50)
    stalled = sum(1 for v in lat if p50 is not None and v > STALLED_FACTOR * p50)
    return LoadSummary(
        requests=len(results),
        ok=ok,
        failed=sum(1 for r in results if r.outcome == "failed"),
        truncated=sum(1 for r in results if r.outcome == "truncated"),
        p50_ms=rnd(percentile(lat, 50)),
        p99_ms=rnd(percentile(lat, 99)),
        ttft_p50_ms=rnd(percentile(ttft, 50)),
        ttft_p99_ms=rnd(percentile(ttft, 99)),
        rps=round(ok / seconds, 2) if seconds > 0 else 0.0,
        stalled=stalled,
        longest_wait_s=round(max(waits), 2) if waits else None,
        errors=dict(sorted(errors.items(), key=lambda kv: -kv[1])),
    )


# --- as a process of its own ------------------------------------------------------------------


def _stop(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description="steady load; one JSON line per request")
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="JSON lines: first {'started_at': t}, then one per request")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--stream-ratio", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--max-retries", type=int, default=0)
    p.add_argument("--connect-timeout", type=float, default=5.0)
    p.add_argument("--read-timeout", type=float)
    p.add_argument("--max-connections", type=int, default=4)
    a = p.parse_args(argv)
    cfg = LoadConfig(
        a.base_url,
        a.model,
        a.concurrency,
        a.stream_ratio,
        a.max_tokens,
        a.request_timeout,
        max_retries=a.max_retries,
        connect_timeout_s=a.connect_timeout,
        read_timeout_s=a.read_timeout,
        max_connections=a.max_connections,
    )
    out = open(a.out, "a", buffering=1)  # line-buffered: the drill reads it while the load runs
    lock = threading.Lock()

    def write(res: Result) -> None:
        with lock:
            if not out.closed:
                out.write(json.dumps(asdict(res)) + "\n")

    signal.signal(signal.SIGTERM, _stop)
    load = LoadGenerator(cfg, on_result=write)
    try:
        load.start()
        with lock:
            out.write(json.dumps({"started_at": load.started_at}) + "\n")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        load.stop(wait_s=a.request_timeout + 5)
    with lock:
        out.write(json.dumps({"stopped_at": load.stopped_at}) + "\n")
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
