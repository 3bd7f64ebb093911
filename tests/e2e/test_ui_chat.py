"""The Chainlit UI in headless Chromium against the real mesh (two vLLM engines): a streamed answer
naming its instance; after that instance is killed (SIGKILL), the conversation goes on with the
other one; the killed instance is restarted by its agent and put back."""

from __future__ import annotations

import os
import signal

import pytest

from agent.local.wait import wait_until
from tests.e2e.conftest_up import vllm_mesh  # noqa: F401  (shared session fixture)
from tests.e2e.ui_support import SERVED_BY, ChatPage

pytestmark = pytest.mark.timeout(1500)  # the first test may pay for starting the mesh
ANSWER_TIMEOUT_S = 300.0
RECOVERY_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def page(vllm_mesh):
    with ChatPage(vllm_mesh.plan.ui_url) as p:
        p.open()
        yield p


@pytest.fixture(scope="module")
def seen() -> dict:
    return {}


def body_of(text: str) -> str:
    return text.rsplit(SERVED_BY, 1)[0].strip()


def test_answer_is_streamed_and_names_the_serving_instance(vllm_mesh, page, seen):
    reply = page.ask("What is the capital of France?", timeout_s=ANSWER_TIMEOUT_S)
    assert "⚠" not in reply.text, reply.text
    assert body_of(reply.text), reply.text
    assert reply.instance in vllm_mesh.healthy["instances"], reply.text
    assert reply.streamed, f"the answer appeared at once, not streamed: {reply.partials}"
    seen["first"] = reply.instance


def test_conversation_continues_when_the_serving_instance_dies(vllm_mesh, page, seen):
    victim = seen.get("first")
    if victim is None:
        pytest.fail("the previous test got no first answer")
    pid = vllm_mesh.agent_instances()[victim]["pid"]
    assert pid, f"{victim} has no engine pid"
    os.kill(pid, signal.SIGKILL)  # the vLLM server that answered last: a crash, no drain
    reply = page.ask("And what is the capital of Italy?", timeout_s=ANSWER_TIMEOUT_S)
    assert "⚠" not in reply.text, reply.text
    assert body_of(reply.text), reply.text
    assert reply.instance in vllm_mesh.healthy["instances"] and reply.instance != victim, reply.text
    # the other instance got the whole conversation: question, answer, question
    assert "sending 3 message(s) of conversation" in (vllm_mesh.plan.log_dir / "ui.log").read_text()
    seen["killed"] = victim


def test_the_killed_instance_is_restarted_and_put_back(vllm_mesh, seen):
    victim = seen.get("killed")
    if victim is None:
        pytest.fail("the previous test killed no instance")
    from agent.catalog.consul import ConsulCatalog

    catalog = ConsulCatalog(vllm_mesh.plan.consul_address)

    def passing() -> bool:
        _idx, entries = catalog.instances(vllm_mesh.plan.service)
        return any(e.instance_id == victim and e.verdict.state.value == "passing" for e in entries)

    wait_until(passing, RECOVERY_TIMEOUT_S, interval_s=1, what=f"{victim} passing again after its restart")
    assert vllm_mesh.agent_instances()[victim]["restarts"] >= 1
