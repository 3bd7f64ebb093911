"""`python -m bench.routing`: where requests go, measured by what users of a prefix-heavy chat see.

Three systems side by side in one run, each on its own fresh engines (same count, same settings):
ernie-mesh with affinity routing (the default), ernie-mesh with `[routing] mode = "least-request"`,
and the naive design's nginx round robin (bench/baseline). The workload is many users of a few
long system prompts: each client runs conversations of several turns, each turn repeating the
conversation so far (as chat clients do); no client names a session. Two fleets: every engine
alike ("even"), and one engine slowed by SLOW_FACTOR ("skewed": a smaller GPU, a noisy neighbour).

Reported per system and fleet: TTFT p50 / p99 of streaming turns, the prefix-cache hit rate from
the engines' own counters (vllm:prefix_cache_hits_total / _queries_total, in tokens: the same
names on vLLM and on the SIMULATED engine), requests per second, failed requests. With
`--engine sim` (default) the engines are SIMULATED, with a prefix cache and a prefill time per
uncached token (agent/sim/prefix_cache.py); `--engine vllm` runs real vLLM (CPU build: slow).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai

from bench.baseline.system import BaselineSystem
from bench.engines import EngineSettings, slow_down
from bench.keys import BENCH_API_KEY
from bench.mesh import MeshSystem
from bench.system import System

SYSTEM_PROMPTS = 8
SYSTEM_WORDS = 400  # the simulated tokenizer: a word a token
VLLM_SYSTEM_WORDS = 150
TURNS = 3
SLOW_FACTOR = 3.0
# The simulated engines: a prefix cache holding about five of the eight system prompts per engine,
# and a prefill of 2 ms per uncached token (a cold 400-token system prompt: 0.8 s of TTFT).
SIM_ARGS = ("--prefix-cache-blocks", "128", "--prefill-ms-per-token", "2")
Figures = dict[str, Any]


def progress(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} routing: {msg}", file=sys.stderr, flush=True)


def system_prompts(words: int) -> list[str]:
    return [" ".join(f"rule{k}w{i}" for i in range(words)) for k in range(SYSTEM_PROMPTS)]


def cache_counters(system: System) -> tuple[float, float]:
    """(hit tokens, queried tokens) summed over the system's engines, from their /metrics."""
    hits = queries = 0.0
    for i in range(system.n):
        try:
            text = httpx.get(f"{system.engine_url(i)}/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        hits += _sample(text, "vllm:prefix_cache_hits_total")
        queries += _sample(text, "vllm:prefix_cache_queries_total")
    return hits, queries


def _sample(text: str, name: str) -> float:
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.MULTILINE):
        total += float(m.group(1))
    return total


class ChatUsers:
    """`clients` threads, each a user running conversations of TURNS streaming turns back to back."""

    def __init__(self, base_url: str, model: str, clients: int, words: int, max_tokens: int, seed: int = 7):
        self.base_url, self.model, self.clients, self.max_tokens = base_url, model, clients, max_tokens
        self.prompts = system_prompts(words)
        self.seed = seed
        self.ttft: list[float] = []
        self.failed: list[str] = []
        self.done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def run(self, seconds: float) -> None:
        threads = [threading.Thread(target=self._user, args=(k,), daemon=True) for k in range(self.clients)]
        for t in threads:
            t.start()
        self._stop.wait(seconds)
        self._stop.set()
        for t in threads:
            t.join(120)

    def _user(self, k: int) -> None:
        rnd = random.Random(self.seed * 1000 + k)
        with openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=BENCH_API_KEY, max_retries=0, timeout=300) as c:
            conversation = 0
            while not self._stop.is_set():
                conversation += 1
                messages: list[Any] = [{"role": "system", "content": rnd.choice(self.prompts)}]
                for turn in range(TURNS):
                    if self._stop.is_set():
                        return
                    messages.append({"role": "user", "content": f"user {k} conversation {conversation} turn {turn}"})
                    answer = self._turn(c, messages)
                    if answer is None:
                        break
                    messages.append({"role": "assistant", "content": answer})

    def _turn(self, c: openai.OpenAI, messages: list[Any]) -> str | None:
        t0 = time.perf_counter()
        first: float | None = None
        parts = []
        try:
            for chunk in c.chat.completions.create(
                model=self.model, messages=messages, max_tokens=self.max_tokens, temperature=0, stream=True
            ):
                for ch in chunk.choices:
                    if ch.delta.content:
                        if first is None:
                            first = time.perf_counter() - t0
                        parts.append(ch.delta.content)
        except openai.APIError as e:
            with self._lock:
                self.failed.append(f"{type(e).__name__}: {str(e)[:120]}")
            return None
        with self._lock:
            self.done += 1
            if first is not None:
                self.ttft.append(first)
        return "".join(parts)


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def measure(system: System, model: str, clients: int, seconds: float, words: int, max_tokens: int) -> Figures:
    hits0, queries0 = cache_counters(system)
    users = ChatUsers(system.base_url, model, clients, words, max_tokens)
    t0 = time.monotonic()
    users.run(seconds)
    elapsed = time.monotonic() - t0
    hits1, queries1 = cache_counters(system)
    queried = queries1 - queries0
    return {
        "requests": users.done,
        "failed": len(users.failed),
        "failures": users.failed[:5],
        "rps": round(users.done / elapsed, 2),
        "ttft_p50_s": _round(_percentile(users.ttft, 50)),
        "ttft_p99_s": _round(_percentile(users.ttft, 99)),
        "hit_rate": round((hits1 - hits0) / queried, 3) if queried else None,
    }


def vllm_bench_serve(system: System, settings: EngineSettings, workdir: Path) -> Figures:
    """vLLM's own benchmark client (`vllm bench serve`, started by bench/vllm_bench_serve.py: the
    console script fails on this build's metadata) through the system, dataset prefix_repetition:
    what users measure us with. Real vLLM only (it needs the model's tokenizer)."""
    out_dir = workdir / "vllm-bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "bench.vllm_bench_serve",
        "--backend",
        "openai",
        "--base-url",
        system.base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        settings.served_model_name,
        "--tokenizer",
        settings.model,
        "--dataset-name",
        "prefix_repetition",
        "--prefix-repetition-prefix-len",
        "256",
        "--prefix-repetition-suffix-len",
        "32",
        "--prefix-repetition-num-prefixes",
        "4",
        "--prefix-repetition-output-len",
        "16",
        "--num-prompts",
        "48",
        "--max-concurrency",
        "4",
        "--save-result",
        "--result-dir",
        str(out_dir),
        "--result-filename",
        "result.json",
    ]
    env = {**os.environ, "OPENAI_API_KEY": BENCH_API_KEY}
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=Path(__file__).resolve().parent.parent
    )
    try:
        r = json.loads((out_dir / "result.json").read_text())
    except (OSError, ValueError):
        return {"error": (done.stderr or done.stdout).strip()[-300:]}
    keep = ("completed", "request_throughput", "median_ttft_ms", "p99_ttft_ms", "mean_ttft_ms")
    return {k: round(r[k], 3) if isinstance(r.get(k), float) else r.get(k) for k in keep}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


SYSTEMS: dict[str, Callable[[EngineSettings, int, Path], System]] = {
    "mesh affinity": lambda s, n, d: MeshSystem(s, n, d, progress),
    "mesh least-request": lambda s, n, d: MeshSystem(
        s, n, d, progress, gateway_settings={"routing": {"mode": "least-request"}}
    ),
    "nginx round robin": lambda s, n, d: BaselineSystem(s, n, d, progress),
}


def run(
    workdir: Path,
    engine: str = "sim",
    engines: int = 3,
    clients: int = 8,
    seconds: float = 60.0,
    max_tokens: int = 16,
    model: str = "",
) -> Figures:
    settings = (
        EngineSettings(kind="sim", token_delay_ms=10.0, sim_args=SIM_ARGS)
        if engine == "sim"
        else EngineSettings(kind="vllm", model=model, vllm_args=("--enable-prefix-caching",))
    )
    # vLLM's tokenizer makes ~3 tokens of each "ruleKwN" word: 150 words are ~450 tokens
    words = SYSTEM_WORDS if engine == "sim" else VLLM_SYSTEM_WORDS
    rows = []
    # a real vLLM engine has no speed knob (the simulated engine's slow fault): even fleet only
    for fleet in ("even", "skewed") if engine == "sim" else ("even",):
        systems = dict(SYSTEMS)
        if engine == "vllm":  # does a second engine help such users at all? (issue 13: it made TTFT 5x worse)
            systems["one engine (nginx in front)"] = lambda s, n, d: BaselineSystem(s, 1, d, progress)
        for name, make in systems.items():
            system = make(settings, engines, workdir / f"{fleet}-{name.replace(' ', '-')}")
            progress(f"{fleet} fleet, {name}: starting {system.n} {engine} engine(s)")
            system.start()
            try:
                system.wait_all_in_rotation(settings.start_timeout_s)
                if fleet == "skewed":
                    slow_down(settings, system.engine_url(0), SLOW_FACTOR)
                figures = measure(system, settings.served_model_name, clients, seconds, words, max_tokens)
                if engine == "vllm":
                    figures["vllm_bench_serve"] = vllm_bench_serve(system, settings, workdir / fleet / name)
            finally:
                system.stop()
            progress(f"{fleet} fleet, {name}: {figures}")
            rows.append({"fleet": fleet, "system": name, **figures})
    return {
        "engine": engine,
        "engines": engines,
        "clients": clients,
        "seconds": seconds,
        "system_prompts": SYSTEM_PROMPTS,
        "system_prompt_words": words,
        "turns": TURNS,
        "slow_factor": SLOW_FACTOR,
        "rows": rows,
    }


ROUTING_NOTE = (
    "Many users of a few long system prompts (8 of 400 tokens, conversations of 3 turns, no session "
    "named), SIMULATED engines with vLLM's prefix-cache counters (a cache holding about five of the "
    "eight prompts per engine, 2 ms of prefill per uncached token), each system on its own fresh "
    "engines, one after the other. *skewed*: one engine 3x slower (the simulated `slow` fault) from "
    "the start of the load; the gateway learns it from the engines' canary latencies within about "
    "15 s (three readings 5 s apart), inside the measured window. `python -m bench --only routing`; "
    "`python -m bench.routing --engine vllm` runs real vLLM. Design: [gateway.md](gateway.md#routing-routing)."
)


ROUTING_VLLM_NOTE = (
    "The same workload with real vLLM engines (CPU build, the embedded model, each engine on its own "
    "core), ~450-token system prompts, the even fleet only (vLLM has no speed knob), and one engine "
    "alone behind nginx for comparison; then vLLM's own client (`vllm bench serve`) through each "
    "system. `python -m bench.routing --engine vllm --engines 2`."
)


def part_name(engine: str) -> str:
    """The part of bench/results/latest.json a run fills: simulated and vLLM runs side by side."""
    return "routing" if engine == "sim" else "routing_vllm"


def markdown(r: Figures) -> str:
    lines = [
        "| fleet | system | requests | failed | req/s | TTFT p50 s | TTFT p99 s | prefix-cache hit rate |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['fleet']} | {x['system']} | {x['requests']} | {x['failed']} | {x['rps']} | "
            f"{x['ttft_p50_s']} | {x['ttft_p99_s']} | {x['hit_rate']} |"
        )
    served = [x for x in r["rows"] if x.get("vllm_bench_serve")]
    if served:
        lines += [
            "",
            "vLLM's own client (`vllm bench serve`, run by `python -m bench.vllm_bench_serve`, dataset "
            "`prefix_repetition`: 4 prefixes of 256 tokens, 32-token suffixes, 16 output tokens, 48 prompts, "
            "4 at a time) through each system:",
            "",
            "| system | completed | req/s | TTFT median ms | TTFT p99 ms |",
            "|---|--:|--:|--:|--:|",
        ]
        for x in served:
            v = x["vllm_bench_serve"]
            lines.append(
                f"| {x['system']} | {v.get('completed', '-')} | {v.get('request_throughput', '-')} | "
                f"{v.get('median_ttft_ms', '-')} | {v.get('p99_ttft_ms', v.get('error', '-'))} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__)
    p.add_argument("--engine", choices=("sim", "vllm"), default="sim")
    p.add_argument("--engines", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0, help="of load per system and fleet")
    p.add_argument("--model", default="", help="vLLM: the model path (default: the embedded model)")
    a = p.parse_args(argv)
    model = a.model
    if a.engine == "vllm" and not model:
        from agent.model import default_model_dir

        model = str(default_model_dir())
    from bench.document import write
    from bench.run import load_results, save_results, stamp

    with tempfile.TemporaryDirectory(prefix="ernie-routing-") as d:
        r = run(Path(d), a.engine, a.engines, a.clients, a.seconds, model=model)
    results = load_results()
    results[part_name(a.engine)] = stamp(r)
    save_results(results)
    write(results)
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
