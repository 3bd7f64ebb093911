"""The engine's lifetime is bound to its agent's, the same under systemd and `ernie-mesh up`
(issue 12, item 1, engine half): PR_SET_PDEATHSIG on the engine, its own process group kept."""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from agent import pids
from agent.engine import config as engine_config
from agent.engine import supervisor
from agent.engine.supervisor import EngineProcess

REPO = Path(__file__).resolve().parents[2]

# A stand-in engine laid out like vLLM: an API server process with an "EngineCore" child that does
# not notice its parent's death. Reports its parent-death signal, session and the child, then sleeps.
REPORT = textwrap.dedent(
    """
    import ctypes, json, os, sys, time
    sig = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    core = os.fork()
    if core == 0:
        time.sleep(120)
        os._exit(0)
    info = {"pid": os.getpid(), "pdeathsig": sig.value, "sid": os.getsid(0), "pgid": os.getpgid(0), "core": core}
    open(sys.argv[1] + ".tmp", "w").write(json.dumps(info)); os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(120)
    """
)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        time.sleep(0.02)


def test_the_engine_gets_sigkill_when_its_agent_dies_and_keeps_its_own_session(monkeypatch, tmp_path):
    """Before: start_new_session only; the engine outlived a SIGKILLed agent (pdeathsig 0)."""
    report = tmp_path / "engine.json"
    monkeypatch.setattr(supervisor, "engine_command", lambda spec: [sys.executable, "-c", REPORT, str(report)])
    cfg = engine_config.load(["--node", "n1", "--advertise-address", "127.0.0.1", "--engine", "simulated:8001"])
    p = EngineProcess(cfg.engines[0], cfg, "test-engine")

    async def scenario():
        run = asyncio.create_task(p.run())
        while not report.exists():
            await asyncio.sleep(0.02)
        info = json.loads(report.read_text())
        spawned_on = getattr(p, "spawn_thread", None)
        alive_then = spawned_on is not None and spawned_on.is_alive()
        reaper = p.reaper.pid if getattr(p, "reaper", None) else None
        await p.stop()
        await run
        return info, spawned_on, alive_then, reaper

    info, spawned_on, alive_then, reaper = asyncio.run(scenario())
    assert info["pdeathsig"] == signal.SIGKILL, info
    assert info["sid"] == info["pid"] == info["pgid"], info  # its own session: Ctrl-C reaches the agent only
    # PR_SET_PDEATHSIG follows the thread that forked: the event loop's, alive as long as the agent
    assert spawned_on is threading.main_thread() and alive_then
    # a reaper stood by for the engine's group and left with it (stopped by the agent: no signal)
    assert reaper is not None and pids.state(reaper) in ("", "Z", "X") and p.reaper is None


AGENT = textwrap.dedent(
    """
    import asyncio, dataclasses, sys
    from agent.engine import config as engine_config, supervisor
    supervisor.engine_command = lambda spec: [sys.executable, "-c", sys.argv[2], sys.argv[1]]
    cfg = engine_config.load(["--node", "n1", "--advertise-address", "127.0.0.1", "--engine", "simulated:8001"])
    asyncio.run(supervisor.EngineProcess(cfg.engines[0], cfg, "stand-in").run())
    """
)


def test_a_sigkilled_agent_takes_its_engine_with_it(tmp_path):
    report = tmp_path / "engine.json"
    agent = subprocess.Popen([sys.executable, "-c", AGENT, str(report), REPORT], cwd=REPO, start_new_session=True)
    try:
        info = json.loads(wait_for(lambda: report.exists() and report.read_text(), 30, "the engine started"))
        engine, core = info["pid"], info["core"]
        assert pids.state(engine) not in ("", "Z", "X") and pids.state(core) not in ("", "Z", "X")
        agent.kill()
        agent.wait(5)
        wait_for(lambda: pids.state(engine) in ("", "Z", "X"), 5, f"engine pid {engine} gone")
        # its child too, which does not notice its parent's death (vLLM's EngineCore does not)
        wait_for(lambda: pids.state(core) in ("", "Z", "X"), 5, f"engine child pid {core} gone")
    finally:
        agent.kill()
        agent.wait(5)
        pgid = json.loads(report.read_text())["pgid"] if report.exists() else 0
        if pgid > 1:  # the stand-in's own group (never 0 or 1: those would mean ours, or every process)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_child_forked_after_its_agent_died_does_not_start():
    preexec = supervisor.bind_to_agent(agent_pid=os.getpid() + 1_000_000)  # "the agent" is not our parent
    r = subprocess.run([sys.executable, "-c", "print('started')"], preexec_fn=preexec, capture_output=True)
    assert r.returncode == 126 and b"started" not in r.stdout


def test_the_engine_units_stop_the_agent_first_and_vllm_with_it():
    """KillMode=mixed: SIGTERM to the agent only (it drains, then stops vLLM); whatever is left at the
    end gets SIGKILL. The engine dies with a crashed agent under systemd as under `up` (PDEATHSIG)."""
    for unit in (
        REPO / "deploy/systemd/ernie-engine.service",
        REPO / "deploy/ansible/roles/ernie_engine/templates/ernie-engine.service.j2",
    ):
        parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#",))
        parser.optionxform = str
        parser.read_string(unit.read_text())
        service = dict(parser["Service"])
        assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM", unit
        assert "PDEATHSIG" in unit.read_text(), f"{unit}: the comment should say the engine dies with the agent"
