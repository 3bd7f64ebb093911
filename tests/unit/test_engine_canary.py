"""The canary loop and probe against a fake engine (httpx.MockTransport): odd answers are failures, never a
dead loop with a frozen last result."""

import asyncio
import dataclasses

import httpx
import pytest

from agent.catalog.memory import MemoryCatalog
from agent.engine import config as engine_config
from agent.engine.instance import InstanceController
from agent.engine.metrics import EngineAgentMetrics
from agent.engine.probe import EngineProbe

METRICS = (
    'vllm:num_requests_running{engine="0",model_name="m"} 0.0\n'
    'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0\n'
    'vllm:generation_tokens_total{engine="0",model_name="m"} 5.0\n'
)
WAIT_S = 5.0  # deadline for the events below (the loop runs every 10 ms)


def controller(completions) -> InstanceController:
    """An attached engine whose /v1/completions answers with `completions(request)`."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=METRICS)
        if request.url.path == "/v1/completions":
            return completions(request)
        return httpx.Response(404)

    cfg = engine_config.load(
        ["--node", "n1", "--advertise-address", "127.0.0.1", "--engine", "attach:http://127.0.0.1:8001"]
    )
    cfg = dataclasses.replace(cfg, canary_interval_s=0.01)
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    c = InstanceController(cfg, cfg.engines[0], MemoryCatalog(), client, EngineAgentMetrics())
    c.health_ok = True
    return c


async def run_until(c: InstanceController, event: asyncio.Event) -> None:
    task = asyncio.create_task(c._canary_loop())
    try:
        await asyncio.wait_for(event.wait(), WAIT_S)
        assert not task.done(), task.exception() if task.done() else ""
    finally:
        c.stop()
        await asyncio.wait_for(task, WAIT_S)


@pytest.mark.parametrize("body", [[], "text", 3, {"choices": "abc"}, {"choices": [1]}, {"choices": [None]}])
def test_an_odd_completion_body_is_a_failed_canary_not_an_exception(body):
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, json=body)))
    res = asyncio.run(EngineProbe("http://e", client).canary("m", "Hi", 1.0))
    assert res.ok is False
    assert res.error.startswith("answer is not a completion"), res.error


def test_canary_loop_survives_odd_bodies_and_keeps_reporting_them():
    async def scenario():
        calls = 0
        third = asyncio.Event()

        def completions(_):
            nonlocal calls
            calls += 1
            if calls >= 3:
                third.set()
            return httpx.Response(200, json=["not", "a", "completion"])

        c = controller(completions)
        await run_until(c, third)
        assert c.canary.last_ok is False
        assert c.canary.last_error.startswith("answer is not a completion")
        assert c.canary.consecutive_failures >= 2

    asyncio.run(scenario())


def test_canary_loop_survives_an_unexpected_error_and_the_result_is_not_frozen():
    async def scenario():
        answers = iter(["ok", "boom", "ok"])
        third = asyncio.Event()
        seen, state_before_third = [], []
        holder = {}

        def completions(_):
            seen.append(next(answers, "ok"))
            if len(seen) == 3:  # the second canary's outcome is recorded by now
                state_before_third.append((holder["c"].canary.last_ok, holder["c"].canary.last_error))
                third.set()
            return httpx.Response(200, json={"choices": [{"text": "!", "finish_reason": "length"}]})

        c = holder["c"] = controller(completions)
        real = c.probe.canary

        async def canary(*args, **kwargs):
            res = await real(*args, **kwargs)
            if seen[-1] == "boom":
                raise RuntimeError("probe bug")
            return res

        c.probe.canary = canary
        await run_until(c, third)
        assert state_before_third == [(False, "canary probe failed: RuntimeError: probe bug")]
        assert c.canary.ever_succeeded

    asyncio.run(scenario())


def test_a_timed_out_canary_is_still_owed_across_the_retry_until_an_answer():
    """What the CPU-time verdict counts as 'work in flight': from the first unanswered canary on, across
    the immediate retry, until the engine answers one."""

    async def scenario():
        owed_at_call, done = [], asyncio.Event()
        holder = {}

        async def completions(request):
            owed_at_call.append(holder["c"]._canary_owed_since_s)
            if len(owed_at_call) <= 2:
                await asyncio.sleep(0.05)  # the engine's (simulated) silence, longer than the interval
                raise httpx.ReadTimeout("no answer", request=request)
            done.set()
            return httpx.Response(200, json={"choices": [{"text": "!", "finish_reason": "length"}]})

        c = holder["c"] = controller(completions)
        await run_until(c, done)
        first, second, third = owed_at_call[:3]
        assert first is not None and first == second == third  # one run, not restarted by the retry
        assert c._canary_owed_since_s is None  # answered
        assert c.canary.last_ok is True and c.canary.consecutive_failures == 0

    asyncio.run(scenario())
