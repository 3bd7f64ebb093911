"""EngineProcess (agent/engine/supervisor.py) with stand-in commands: a crash loop keeps retrying,
and a stop during a spawn stops the process spawned a moment later."""

import asyncio
import dataclasses
import sys
import time

from agent.catalog.base import VerdictCause, VerdictState
from agent.engine import config as engine_config
from agent.engine import supervisor
from agent.engine.supervisor import EngineProcess
from agent.engine.verdict import CanaryFacts, Facts, Policy, decide


def process(monkeypatch, code: str, **settings) -> EngineProcess:
    monkeypatch.setattr(supervisor, "engine_command", lambda spec: [sys.executable, "-c", code])
    cfg = engine_config.load(["--node", "n1", "--advertise-address", "127.0.0.1", "--engine", "simulated:8001"])
    cfg = dataclasses.replace(cfg, **settings)
    return EngineProcess(cfg.engines[0], cfg, "test-engine")


async def until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        await asyncio.sleep(0.02)


def verdict_of(p: EngineProcess):
    now = time.monotonic()
    return decide(
        Facts(
            now_s=now,
            started_at_s=p.started_at_s,
            process=p.facts(now),
            health_ok=None,
            health_error="",
            running=None,
            waiting=None,
            stalled_for_s=0.0,
            canary=CanaryFacts(),
        ),
        Policy(),
    )


def test_a_crash_loop_keeps_retrying_at_the_capped_backoff_and_is_reported(monkeypatch):
    """Before: after 5 exits in 300 s the supervisor stopped restarting for good (the agent up, the
    engine never back without a restart of the agent)."""
    p = process(
        monkeypatch,
        "raise SystemExit(3)",
        restart_backoff_initial_s=0.01,
        # an engine up for 2x this is taken to have recovered: on a loaded machine even a Python
        # that exits at once can take 0.4 s to start and exit (the run at load 44 failed so at 0.2 s)
        restart_backoff_max_s=2.0,
        crash_loop_restarts=2,
    )

    async def scenario():
        run = asyncio.create_task(p.run())
        await until(lambda: p.crash_loop, 30, "crash loop")
        v = verdict_of(p)
        assert (v.state, v.cause) == (VerdictState.CRITICAL, VerdictCause.CRASH_LOOP), v
        generation = p.generation
        await until(lambda: p.generation >= generation + 2, 30, "retries during the crash loop")
        assert p.crash_loop and p.restarts >= 3
        await asyncio.wait_for(p.stop(), 10)
        await asyncio.wait_for(run, 10)

    asyncio.run(scenario())


def test_a_crash_loop_ends_once_a_retry_stays_up(monkeypatch, tmp_path):
    flag = tmp_path / "fixed"
    code = f"import os, sys, time\nif not os.path.exists({str(flag)!r}): sys.exit(3)\ntime.sleep(60)"
    p = process(monkeypatch, code, restart_backoff_initial_s=0.01, restart_backoff_max_s=0.2, crash_loop_restarts=2)

    async def scenario():
        run = asyncio.create_task(p.run())
        await until(lambda: p.crash_loop, 30, "crash loop")
        flag.write_text("")  # the engine is fixed
        await until(lambda: p.running, 30, "a retry running")
        assert verdict_of(p).cause is not VerdictCause.CRASH_LOOP  # a running retry is judged like a start
        await until(lambda: not p.crash_loop, 30, "crash loop over")
        await asyncio.wait_for(p.stop(), 10)
        await asyncio.wait_for(run, 10)

    asyncio.run(scenario())


def test_a_stop_during_the_spawn_stops_the_process_spawned_a_moment_later(monkeypatch):
    """Before: stop() returned at once while proc was None; the process spawned a moment later was
    waited on forever (shutdown hung)."""
    p = process(monkeypatch, "import time; time.sleep(60)")
    real_exec = asyncio.create_subprocess_exec
    spawning = asyncio.Event()

    async def slow_exec(*args, **kwargs):
        spawning.set()
        await asyncio.sleep(0.5)  # a slow fork/exec (a loaded host, a big environment)
        return await real_exec(*args, **kwargs)

    monkeypatch.setattr(supervisor.asyncio, "create_subprocess_exec", slow_exec)

    async def scenario():
        run = asyncio.create_task(p.run())
        await spawning.wait()
        await asyncio.wait_for(p.stop(), 15)
        await asyncio.wait_for(run, 15)
        assert not p.running

    asyncio.run(scenario())
