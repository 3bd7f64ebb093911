"""An engine agent does not take over a live registration that another agent owns (issue 12, item 9),
against a real `consul agent -dev`. Two agents configured with the same engine compute the same
instance ID (same node, address and port); the second refuses."""

from __future__ import annotations

import signal

from agent.catalog.keeper import OWNER_META
from agent.local.ports import free_port
from agent.local.wait import wait_until
from agent.sim.process import SimEngineProcess
from tests.integration.engine_support import EngineAgent

SERVICE = "ernie-it-identity"
TTL_S = 3.0  # short, to see it expire: the least the agent allows with refreshes every second
TTL_REFRESH_S = 1.0


def test_a_second_agent_refuses_to_take_over_a_live_registration(consul_session, tmp_path):
    port = free_port()
    with SimEngineProcess(port, model="shared-model", log_path=str(tmp_path / "sim.log")) as engine:

        def agent() -> EngineAgent:
            return EngineAgent(
                tmp_path,
                consul_session.address,
                SERVICE,
                node="same",
                engines=[{"url": engine.url}],
                ttl_s=TTL_S,
                ttl_refresh_s=TTL_REFRESH_S,
            )

        first, second = agent(), agent()
        iid = first.instance_id(port)
        assert second.instance_id(port) == iid
        with first:
            owned = first.wait_state(iid, "passing", timeout_s=30)
            assert owned.meta["agent_url"] == first.url

            # 1. while the first agent's registration is live, the second exits 2 with one line
            second.start()
            code = second.proc.wait(timeout_s=30)
            log = second.proc.log_tail()
            assert code == 2, log
            [line] = [ln for ln in log.splitlines() if "refusing" in ln]
            assert line.startswith(f"ernie-mesh engine: instance {iid} is registered in Consul by another engine agent")
            assert owned.meta[OWNER_META] in line and first.url in line
            now = first.entries()[iid]
            assert now.status.value == "passing"
            assert (now.meta["agent_url"], now.meta[OWNER_META]) == (first.url, owned.meta[OWNER_META])

            # 2. the first agent killed: its own restart takes the registration back at once
            first.proc.kill()
            first.start()
            again = first.wait_state(iid, "passing", timeout_s=30)
            assert again.meta[OWNER_META] == owned.meta[OWNER_META]
            assert "refusing" not in first.proc.log_tail()

            # 3. killed for good: once Consul expired its TTL, the registration is the second's to take
            first.proc.kill()
            wait_until(
                lambda: first.entries()[iid].note.startswith("TTL expired"),
                TTL_S + 10,
                what=f"{iid}'s TTL expiring in Consul",
            )
            with second:
                taken = second.wait_state(iid, "passing", timeout_s=30)
                assert taken.meta["agent_url"] == second.url and taken.meta[OWNER_META] != owned.meta[OWNER_META]
                assert second.proc.alive()
                second.proc.signal(signal.SIGTERM)
                assert second.proc.wait(timeout_s=30) == 0
