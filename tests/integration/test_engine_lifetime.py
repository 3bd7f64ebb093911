"""A SIGKILLed engine agent takes its engine with it (issue 12, item 1, engine half): nothing is left
holding the port with nobody reporting its health, and the agent's successor starts at once."""

from __future__ import annotations

import time

import httpx

from agent import pids
from agent.local.ports import free_port
from agent.local.wait import wait_until
from agent.net import can_bind
from tests.integration.engine_support import EngineAgent

SERVICE = "ernie-it-lifetime"
GONE_WITHIN_S = 3.0


def test_a_sigkilled_agent_leaves_no_engine_and_its_successor_serves(consul_session, tmp_path):
    port = free_port()
    a = EngineAgent(
        tmp_path, consul_session.address, SERVICE, node="life", engines=[{"kind": "simulated", "port": port}]
    )
    iid = a.instance_id(port)
    with a:
        a.wait_state(iid, "passing", timeout_s=60)
        engine = a.instances()[iid]["pid"]
        assert pids.alive(engine) and not can_bind("127.0.0.1", port)

        a.proc.kill()  # the agent alone, as a crash or the OOM killer would
        t0 = time.monotonic()
        wait_until(lambda: not pids.alive(engine), GONE_WITHIN_S, what=f"engine pid {engine} gone")
        wait_until(lambda: can_bind("127.0.0.1", port), GONE_WITHIN_S, what=f"engine port {port} free")
        gone_s = time.monotonic() - t0
        assert gone_s < GONE_WITHIN_S

        # the successor (systemd's restart, or `up`'s) starts its own engine on the port at once
        a.start()

        def serving_pid():
            try:
                i = a.instances()[iid]
            except httpx.HTTPError:
                return None  # its API is not up yet (Consul still shows the last verdict of the killed one)
            return i["pid"] if i["state"] == "passing" else None

        successor_engine = wait_until(serving_pid, 60, what="the successor's engine passing")
        assert successor_engine != engine
        a.wait_state(iid, "passing", timeout_s=10)
        assert "engine exited" not in a.proc.log_tail(200)  # no bind failure and restart on the way
