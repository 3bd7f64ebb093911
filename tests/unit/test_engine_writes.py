"""Consul writes only when the verdict changes or the TTL needs refreshing, and the TTL is refreshed
from its own task, not the probe loop (docs/architecture.md §2.1)."""

import asyncio
import dataclasses
from dataclasses import replace

import httpx
import pytest

from agent.catalog.memory import MemoryCatalog
from agent.engine import config as engine_config
from agent.engine.instance import InstanceController
from agent.engine.metrics import EngineAgentMetrics
from agent.engine.verdict import CanaryFacts, ProcessFacts, WorkerFacts, decide
from tests.unit.test_verdict import HEALTHY, POLICY

LOADING = replace(HEALTHY, health_ok=False, health_error="connection refused", canary=CanaryFacts())


@pytest.mark.parametrize(
    "earlier, later",
    [
        (replace(LOADING, now_s=901.0), replace(LOADING, now_s=937.0)),  # "loading model (37s)" ticked
        (replace(LOADING, now_s=1600.0), replace(LOADING, now_s=1700.0)),  # not ready N s after start
        (replace(HEALTHY, draining=True, running=5), replace(HEALTHY, draining=True, running=1, waiting=2)),
        (
            replace(HEALTHY, process=ProcessFacts(running=False, exit_code=1, next_restart_in_s=4.0)),
            replace(HEALTHY, process=ProcessFacts(running=False, exit_code=1, next_restart_in_s=3.0)),
        ),
        (replace(HEALTHY, stalled_for_s=9.0, running=3), replace(HEALTHY, stalled_for_s=21.0, running=2)),
        (
            replace(HEALTHY, worker=WorkerFacts(stopped=("w (pid 7)",), stopped_for_s=2.0)),
            replace(HEALTHY, worker=WorkerFacts(stopped=("w (pid 7)",), stopped_for_s=9.0)),
        ),
        (
            replace(HEALTHY, running=2, worker=WorkerFacts(compute_known=True, idle_for_s=2.5)),
            replace(HEALTHY, running=3, worker=WorkerFacts(compute_known=True, idle_for_s=7.5)),
        ),
        (
            replace(HEALTHY, stalled_for_s=9.0, worker=WorkerFacts(compute_known=True)),
            replace(HEALTHY, stalled_for_s=30.0, worker=WorkerFacts(compute_known=True)),
        ),
    ],
)
def test_a_verdict_is_stable_while_its_cause_is(earlier, later):
    """No ticking counters or live load in the note: each change is a Consul write and a snapshot
    rebuild on every gateway."""
    assert decide(earlier, POLICY) == decide(later, POLICY)


def test_the_ttl_is_refreshed_while_the_probe_cycle_hangs():
    """A probe cycle that takes longer than the TTL (probe timeouts + a slow Consul) must not expire a
    healthy instance's check."""
    cat = MemoryCatalog()
    cfg = engine_config.load(
        ["--node", "n1", "--advertise-address", "127.0.0.1", "--engine", "attach:http://127.0.0.1:9"]
    )
    cfg = dataclasses.replace(cfg, probe_interval_s=0.1, ttl_s=0.45, ttl_refresh_s=0.15)
    c = InstanceController(cfg, cfg.engines[0], cat, httpx.AsyncClient(), EngineAgentMetrics())
    real_collect = c.collect
    calls = 0

    async def collect():
        nonlocal calls
        calls += 1
        if calls > 1:
            await asyncio.sleep(30)  # this cycle's probes hang
        return await real_collect()

    c.collect = collect

    async def scenario():
        run = asyncio.create_task(c.run())
        await asyncio.sleep(1.5)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)

    asyncio.run(scenario())
    ops = [op for op, _ in cat.writes]
    assert ops[0] == "register"
    assert ops.count("verdict") >= 5, ops  # every ttl_refresh_s = 0.15 s, without the probe loop


def test_a_steady_starting_instance_writes_nothing_after_registering():
    cat = MemoryCatalog()
    cfg = engine_config.load(
        ["--node", "n1", "--advertise-address", "127.0.0.1", "--engine", "attach:http://127.0.0.1:9"]
    )
    cfg = dataclasses.replace(cfg, probe_interval_s=0.05)
    c = InstanceController(cfg, cfg.engines[0], cat, httpx.AsyncClient(), EngineAgentMetrics())

    async def scenario():
        for _ in range(5):
            await c.reconcile_once()
            await asyncio.sleep(0.2)

    asyncio.run(scenario())
    assert [op for op, _ in cat.writes] == ["register"], cat.writes
