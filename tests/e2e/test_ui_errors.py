"""The UI's messages when nothing can answer, read in headless Chromium: a clear sentence, never a
stack trace, in the welcome of a new chat and in answer to a message. The gateway unreachable (the
UI alone; Consul too: the count of healthy instances is unknown), and no healthy instance (a
SIMULATED mesh, both instances drained: Envoy answers 503 with a JSON error, and the welcome,
reading Consul, finds no instance left). The gateway refusing the UI's API key
(its 401): tests/e2e/test_ui_security.py, behind the UI's login."""

from __future__ import annotations

import httpx
import pytest

from agent.local.ports import free_ports
from agent.local.wait import wait_until
from tests.e2e.conftest_up import UpRun, free_offset
from tests.e2e.ui_support import ChatPage, start_chainlit

pytestmark = pytest.mark.timeout(600)


def test_gateway_unreachable_is_a_clear_message(tmp_path):
    closed = free_ports(1)[0]  # nothing listens there
    ui, url = start_chainlit(tmp_path / "ui.log", f"http://127.0.0.1:{closed}/v1")
    try:
        with ChatPage(url) as page:
            page.open()
            welcome = page.welcome()
            reply = page.ask("Hello?", timeout_s=60)
        assert "gateway is unreachable" in welcome and "how many instances are healthy is unknown" in welcome
        assert "gateway is unreachable" in reply.text, reply.text
        assert "make up" in reply.text and f"127.0.0.1:{closed}" in reply.text
        assert "Traceback" not in reply.text
    finally:
        ui.stop(10)
    assert "Traceback" not in ui.log_path.read_text(errors="replace")


def test_no_healthy_instance_is_a_clear_message(tmp_path):
    run = UpRun(tmp_path / "run", free_offset(tmp_path / "run", engine_kind="simulated"), kind="simulated")
    try:
        run.wait_healthy(timeout_s=180)
        for iid in run.healthy["instances"]:
            port = next(run.plan.agent_port(i) for i in range(2) if run.plan.instance_id(i) == iid)
            token = {"Authorization": f"Bearer {run.plan.control_token_path.read_text().strip()}"}
            assert httpx.post(f"http://127.0.0.1:{port}/drain/{iid}", headers=token, timeout=10).status_code == 202
        key = {"Authorization": f"Bearer {run.plan.api_key()}"}

        def nothing_served() -> bool:
            """The gateway's relay lists no model (200, empty: none has a passing instance)."""
            r = httpx.get(f"{run.plan.api_url}/models", timeout=5, headers=key)
            return r.status_code == 503 or (r.status_code == 200 and r.json().get("data") == [])

        wait_until(nothing_served, 60, interval_s=0.2, what="the gateway serving no model (no instance left)")
        with ChatPage(run.plan.ui_url) as page:
            page.open()
            welcome = page.welcome()
            reply = page.ask("What is the capital of France?", timeout_s=60)
        # draining (not healthy), or already gone: a drained instance leaves the catalog once its engine stopped
        zero = ("none of its 2 instances is healthy right now", "no instance of it is in the mesh now")
        assert any(f"model {run.plan.model_name}: {z}" in welcome for z in zero), welcome
        assert "SIMULATED engines" in welcome, welcome
        assert "No model instance is available" in reply.text, reply.text
        assert "Traceback" not in reply.text
    finally:
        run.shutdown()
    assert run.proc.returncode == 0, run.stderr_tail()
