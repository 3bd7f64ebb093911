"""The SIMULATED engine's prefix cache: the LRU of blocks alone (whole-prefix hits, eviction, token
counts), then through the app (chat prompts sharing a system prompt, vLLM's counters on /metrics and
in /sim/stats, a hit shortening the simulated prefill, the cache off)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.sim import cli, tokens
from agent.sim.app import build_app
from agent.sim.engine import EngineConfig, SimEngine
from agent.sim.faults import Fault, FaultMode
from agent.sim.prefix_cache import PrefixCache
from tests.unit.test_sim_engine import CHAT, COMPLETIONS, metric_values, sse_events

pytestmark = pytest.mark.timeout(30)

LBL = "{model_name=sim-model}"
SYSTEM = " ".join(f"rule{i}" for i in range(400))  # 400 words: 400 tokens
# A chat prompt: <system> 400 words <end_of_turn> <user> ...: the first 403 tokens are the same for
# every user message, so 25 whole blocks of 16 (400 tokens) are shared.
SHARED_SYSTEM_TOKENS = 400


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def chat(user: str, system: str = SYSTEM) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def make(**kw: Any) -> tuple[SimEngine, Any]:
    engine = SimEngine(EngineConfig(name="sim-test", model="sim-model", **{"token_delay_ms": 0.0, **kw}))
    return engine, build_app(engine)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


# --- the cache alone ---------------------------------------------------------------------------------


def test_a_block_hits_only_when_the_whole_prefix_before_it_matches():
    cache = PrefixCache(capacity_blocks=100, block_size=16)
    cache.insert(seq(0, 64))  # 4 blocks
    # the same tokens from the second block on, another first block: nothing hits
    assert cache.lookup([999, *seq(1, 63)]).cached_tokens == 0
    # the first 40 tokens shared, the rest different: the 2 whole blocks before the difference
    assert cache.lookup([*seq(0, 40), *seq(5000, 30)]).cached_tokens == 32
    # a block's tokens cached after another prefix are no hit: the hash covers the prefix too
    cache.insert([*seq(3000, 16), *seq(4000, 16), 1])
    assert cache.lookup([*seq(3000, 16), *seq(16, 16), 1]).cached_tokens == 16
    # a partial last block is never cached: 20 tokens inserted are 1 block
    cache.insert(seq(7000, 20))
    assert cache.cached_blocks == 4 + 2 + 1
    assert cache.lookup([*seq(7000, 20), *seq(1, 20)]).cached_tokens == 16


def test_block_hashes_extend_a_known_prefix_to_the_same_chain():
    """What the engine does when a request ends: the prompt's hashes, extended over the tokens generated."""
    cache = PrefixCache(capacity_blocks=100, block_size=16)
    ids = seq(0, 100)
    full = cache.block_hashes(ids)
    assert len(full) == 6 and len(set(full)) == 6
    assert cache.block_hashes(ids, known=cache.block_hashes(ids[:40])) == full
    assert cache.block_hashes(ids, known=full) == full
    assert cache.lookup(ids).block_hashes == tuple(full)


def test_the_last_prompt_token_is_never_a_hit():
    """As vLLM: the last prompt token is recomputed for its logits, so an n-token prompt hits at most
    (n - 1) // block_size blocks; a block-aligned prompt seen before hits all blocks but its last."""
    cache = PrefixCache(capacity_blocks=100, block_size=16)
    cache.insert(seq(0, 64))
    assert cache.lookup(seq(0, 64)).cached_tokens == 48
    assert cache.lookup(seq(0, 65)).cached_tokens == 64
    assert cache.lookup(seq(0, 16)).cached_tokens == 0
    assert cache.lookup(seq(0, 1)).cached_tokens == 0


def test_counters_are_in_tokens_per_lookup():
    cache = PrefixCache(capacity_blocks=100, block_size=16)
    first = cache.lookup(seq(0, 50))
    cache.insert(seq(0, 50))
    second = cache.lookup([*seq(0, 50), *seq(900, 10)])
    assert (first.prompt_tokens, first.cached_tokens, first.uncached_tokens) == (50, 0, 50)
    assert (second.prompt_tokens, second.cached_tokens, second.uncached_tokens) == (60, 48, 12)
    assert (cache.queries, cache.hits) == (50 + 60, 48)
    cache.insert(seq(0, 50))  # inserting computed tokens is no lookup
    assert (cache.queries, cache.hits) == (110, 48)


def test_lru_eviction_at_capacity_keeps_the_recently_used():
    cache = PrefixCache(capacity_blocks=4, block_size=4)
    a, b, c = seq(0, 9), seq(100, 9), seq(200, 9)  # 2 whole blocks each
    cache.insert(a)
    cache.insert(b)
    assert cache.cached_blocks == 4 and cache.evicted_blocks == 0
    assert cache.lookup(a).cached_tokens == 8  # a is now more recent than b
    cache.insert(c)  # 2 blocks over capacity: b's go
    assert cache.cached_blocks == 4 and cache.evicted_blocks == 2
    assert cache.lookup(b).cached_tokens == 0
    assert cache.lookup(a).cached_tokens == 8
    assert cache.lookup(c).cached_tokens == 8


def test_at_capacity_the_end_of_a_prefix_goes_before_its_beginning():
    cache = PrefixCache(capacity_blocks=3, block_size=4)
    cache.insert(seq(0, 20))  # 5 blocks into 3: the last 2 are evicted, the first 3 stay usable
    assert cache.cached_blocks == 3 and cache.evicted_blocks == 2
    assert cache.lookup(seq(0, 21)).cached_tokens == 12
    cache.insert(seq(100, 8))  # 2 more blocks: the oldest blocks of the first prefix are its tail ones
    assert cache.lookup(seq(0, 21)).cached_tokens == 4


def test_zero_blocks_turns_the_cache_off():
    cache = PrefixCache(capacity_blocks=0, block_size=16)
    cache.insert(seq(0, 64))
    assert cache.lookup(seq(0, 64)).cached_tokens == 0
    assert (cache.cached_blocks, cache.queries, cache.hits) == (0, 0, 0)  # vLLM counts nothing either


@pytest.mark.parametrize("blocks, size", [(-1, 16), (10, 0)])
def test_bad_sizes_are_refused(blocks, size):
    with pytest.raises(ValueError):
        PrefixCache(blocks, size)


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--prefix-cache-blocks", "-1", "must be 0 or more"),
        ("--prefix-cache-blocks", "many", "expected an integer"),
        ("--block-size", "0", "must be at least 1"),
        ("--prefill-ms-per-token", "-0.5", "finite number >= 0"),
    ],
)
def test_bad_flags_are_a_usage_error(capsys, flag, value, needle):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["--port", "8000", flag, value])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_flag_defaults():
    args = cli.build_parser().parse_args(["--port", "8000"])
    assert (args.prefix_cache_blocks, args.block_size, args.prefill_ms_per_token) == (1024, 16, 0.1)


# --- through the engine --------------------------------------------------------------------------------


def test_chats_with_the_same_system_prompt_share_its_blocks_and_vllm_counters_show_it():
    engine, app = make()
    first_ids = tokens.chat_prompt_ids([("system", SYSTEM), ("user", "hello there")], True, False)
    second_ids = tokens.chat_prompt_ids([("system", SYSTEM), ("user", "what now then")], True, False)

    async def go() -> tuple[str, dict[str, Any]]:
        async with client(app) as c:
            for user in ("hello there", "what now then"):
                r = await c.post(CHAT, json={"messages": chat(user), "max_tokens": 1})
                assert r.status_code == 200, r.text
            return (await c.get("/metrics")).text, (await c.get("/sim/stats")).json()

    text, stats = run(go)
    m = metric_values(text)
    queries = len(first_ids) + len(second_ids)
    assert m["vllm:prefix_cache_queries_total" + LBL] == queries
    assert m["vllm:prefix_cache_hits_total" + LBL] == SHARED_SYSTEM_TOKENS
    assert m["vllm:prompt_tokens_total" + LBL] == queries  # prompt tokens still count cached ones
    pc = stats["prefix_cache"]
    assert (pc["queries"], pc["hits"]) == (queries, SHARED_SYSTEM_TOKENS)
    assert (pc["enabled"], pc["block_size"], pc["capacity_blocks"]) == (True, 16, 1024)
    assert pc["cached_blocks"] == len(first_ids) // 16 + (len(second_ids) // 16 - SHARED_SYSTEM_TOKENS // 16)


def test_counters_are_vllm_counters():
    _, app = make()

    async def go() -> str:
        async with client(app) as c:
            return (await c.get("/metrics")).text

    text = run(go)
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["vllm:prefix_cache_queries"] == "counter" == types["vllm:prefix_cache_hits"]
    assert "# TYPE vllm:prefix_cache_queries_total counter" in text  # as vLLM's prometheus_client writes it
    m = metric_values(text)
    assert m["vllm:prefix_cache_queries_total" + LBL] == 0 == m["vllm:prefix_cache_hits_total" + LBL]


def test_a_hit_shortens_the_simulated_prefill():
    """2 ms per uncached token: the cold 400-token system prompt takes >= 0.8 s to its first token
    (timers never fire early); the second request has only its ~10 uncached tokens to prefill."""
    _, app = make(prefill_ms_per_token=2.0)

    async def go() -> list[float]:
        loop = asyncio.get_running_loop()
        out = []
        async with client(app) as c:
            for user in ("hello there", "what now then"):
                t0 = loop.time()
                r = await c.post(CHAT, json={"messages": chat(user), "max_tokens": 1})
                assert r.status_code == 200
                out.append(loop.time() - t0)
        return out

    cold_s, hot_s = run(go)
    assert cold_s >= 0.8
    assert hot_s < cold_s / 2  # ~20 ms of prefill against 800 ms: a generous bound


def test_the_slow_fault_multiplies_the_prefill_too():
    engine, app = make(prefill_ms_per_token=1.0)
    engine.set_fault(Fault(FaultMode.SLOW, slow_factor=5))

    async def go() -> float:
        loop = asyncio.get_running_loop()
        async with client(app) as c:
            t0 = loop.time()
            r = await c.post(COMPLETIONS, json={"prompt": " ".join(["w"] * 100), "max_tokens": 1})
            assert r.status_code == 200
            return loop.time() - t0

    assert run(go) >= 100 * 1.0 * 5 / 1000


def test_with_the_cache_off_nothing_hits_and_every_token_is_prefilled():
    engine, app = make(prefix_cache_blocks=0, prefill_ms_per_token=2.0)

    async def go() -> tuple[list[float], str]:
        loop = asyncio.get_running_loop()
        out = []
        async with client(app) as c:
            for _ in range(2):
                t0 = loop.time()
                assert (await c.post(CHAT, json={"messages": chat("hi"), "max_tokens": 1})).status_code == 200
                out.append(loop.time() - t0)
            return out, (await c.get("/metrics")).text

    (first_s, second_s), text = run(go)
    assert first_s >= 0.8 and second_s >= 0.8
    m = metric_values(text)
    assert m["vllm:prefix_cache_queries_total" + LBL] == 0 == m["vllm:prefix_cache_hits_total" + LBL]
    pc = engine.stats()["prefix_cache"]
    assert (pc["enabled"], pc["cached_blocks"], pc["queries"], pc["hits"]) == (False, 0, 0, 0)


def test_a_resumed_answer_hits_the_blocks_of_what_was_generated():
    """The resuming relay sends prompt + tokens received as token IDs: on the same engine the
    generated tokens' blocks are cached too (every generated token but the last had its KV computed)."""
    engine, app = make()
    prompt = " ".join(f"w{i}" for i in range(40))

    async def go() -> tuple[list[int], list[int]]:
        async with client(app) as c:
            body = {"prompt": prompt, "max_tokens": 40, "ignore_eos": True, "stream": True, "return_token_ids": True}
            events = sse_events((await c.post(COMPLETIONS, json=body)).text)
            choices = [e["choices"][0] for e in events if e != "[DONE]" and e["choices"]]
            prompt_ids = choices[0]["prompt_token_ids"]
            generated = [t for ch in choices for t in ch["token_ids"] or []]
            resumed = {"prompt": prompt_ids + generated[:30], "max_tokens": 10, "ignore_eos": True}
            assert (await c.post(COMPLETIONS, json=resumed)).status_code == 200
            return prompt_ids, generated

    prompt_ids, generated = run(go)
    assert len(prompt_ids) == 40 and len(generated) == 40
    resumed_len = 40 + 30
    assert engine.prefix_cache.hits == (resumed_len - 1) // 16 * 16  # 64: past the prompt's 2 blocks


def test_a_rejected_request_is_no_lookup():
    engine, app = make()

    async def go() -> None:
        async with client(app) as c:
            r = await c.post(CHAT, json={"messages": chat("hi"), "max_tokens": 0})
            assert r.status_code == 400

    run(go)
    assert (engine.prefix_cache.queries, engine.prefix_cache.hits) == (0, 0)


def run(coro_fn: Any) -> Any:
    return asyncio.run(coro_fn())
