"""A drain stops the engine once nothing is in flight and no request arrived for a quiet period, not at
the first idle instant; the deadline stays the bound and says what it cut (issue 12, item 15)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import httpx
import pytest

from agent.catalog.memory import MemoryCatalog
from agent.engine import config as engine_config
from agent.engine.drain import DrainWatch
from agent.engine.instance import InstanceController
from agent.engine.metrics import EngineAgentMetrics
from agent.engine.probe import EngineLoad, parse_load


def load(running=0, waiting=0, finished=0):
    return EngineLoad(running=running, waiting=waiting, generation_tokens=0, requests_finished=finished)


def test_the_default_quiet_period():
    assert engine_config.EngineAgentConfig.__dataclass_fields__["drain_quiet_s"].default == 3.0


def test_idle_between_requests_is_not_drained():
    """Before: two idle readings 0.2 s apart counted as drained, between two requests as well."""
    w = DrainWatch(quiet_s=3.0, started_s=0.0)
    w.observe(load(finished=10), 0.0)
    for t, finished in [(0.2, 10), (0.4, 10), (1.0, 11), (1.2, 11), (2.0, 12), (4.9, 12)]:
        w.observe(load(finished=finished), t)  # a request arrived and finished between two readings
        assert not w.drained(t), t
    assert w.arrived == 2
    assert w.drained(5.0)  # 3 s after the last arrival (seen at 2.0)


def test_work_in_flight_holds_the_drain_and_the_quiet_period_counts_from_its_end():
    w = DrainWatch(quiet_s=1.0, started_s=0.0)
    w.observe(load(running=2, finished=5), 0.0)
    w.observe(load(running=1, waiting=1, finished=5), 5.0)  # long requests: no new arrival, still busy
    assert not w.drained(5.0) and w.arrived == 0
    assert not w.drained(50.0)  # in flight at the last reading, however long ago
    w.observe(load(finished=7), 5.5)  # both finished, nothing new: quiet since the last busy reading
    assert not w.drained(5.9) and w.drained(6.0)


def test_an_unreadable_engine_is_never_drained_by_silence():
    w = DrainWatch(quiet_s=1.0, started_s=0.0)
    w.observe(None, 0.5)
    assert not w.drained(100.0)  # nothing read: we cannot tell it is idle


def test_arrivals_come_from_vllms_counters():
    text = (
        '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} 1.0\n'
        '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} 2.0\n'
        '# TYPE vllm:generation_tokens counter\nvllm:generation_tokens_total{model_name="m"} 50.0\n'
        "# TYPE vllm:request_success counter\n"
        'vllm:request_success_total{finished_reason="stop",model_name="m"} 7.0\n'
        'vllm:request_success_created{finished_reason="stop",model_name="m"} 1.7e9\n'
        'vllm:request_success_total{finished_reason="abort",model_name="m"} 3.0\n'
    )
    parsed = parse_load(text)
    assert parsed is not None and parsed.requests_finished == 10.0 and parsed.requests_seen == 13.0


def controller(metrics_text: str, **settings) -> InstanceController:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=metrics_text) if request.url.path == "/metrics" else httpx.Response(404)

    cfg = engine_config.load(
        ["--node", "n1", "--advertise-address", "127.0.0.1", "--engine", "attach:http://127.0.0.1:9"]
    )
    cfg = dataclasses.replace(cfg, **settings)
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    c = InstanceController(cfg, cfg.engines[0], MemoryCatalog(), client, EngineAgentMetrics())
    c._served_generation = c._engine_generation()  # it had passed: gateways may route to it
    return c


BUSY = (
    "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 2.0\n"
    "# TYPE vllm:generation_tokens counter\nvllm:generation_tokens_total 5.0\n"
)


def test_the_deadline_bounds_the_drain_and_says_it_cut_work(caplog):
    c = controller(BUSY, drain_deadline_s=0.6, drain_quiet_s=0.2)
    with caplog.at_level(logging.INFO):
        outcome = asyncio.run(c._drain())
    assert outcome == "deadline passed, work cut"
    [cut] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "deadline (1s) passed with 2 request(s) in flight: stopping the engine cuts them" in cut


@pytest.mark.parametrize("quiet_s", [0.3, 0.8])
def test_an_idle_engine_is_stopped_after_the_quiet_period(quiet_s):
    idle = BUSY.replace("running 2.0", "running 0.0")
    c = controller(idle, drain_deadline_s=30, drain_quiet_s=quiet_s)

    async def timed():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        outcome = await c._drain()
        return outcome, loop.time() - t0

    outcome, took_s = asyncio.run(timed())
    assert outcome == "quiet" and quiet_s <= took_s < quiet_s + 1.0, took_s
