"""The Chainlit UI in headless Chromium against the real mesh (two vLLM engines): the welcome names the
model and its two healthy instances; the settings panel lists the gateway's model and sets the max
tokens; an answer naming its instance; the instance producing the next, streamed, answer killed
(SIGKILL) in the middle of it: the answer is finished by the other one and says it was resumed there; the
conversation goes on with the survivor; a new chat's welcome counts one healthy instance; the
killed instance is restarted by its agent and put back, and a new chat's welcome counts two again."""

from __future__ import annotations

import httpx
import pytest

from agent.local.plan import ENVOY_ADMIN_PORT
from agent.local.wait import wait_until
from tests.e2e.conftest_up import UI_MAX_TOKENS, vllm_mesh  # noqa: F401  (shared session fixture)
from tests.e2e.ui_support import SERVED_BY, ChatPage

pytestmark = pytest.mark.timeout(1500)  # the first test may pay for starting the mesh
ANSWER_TIMEOUT_S = 300.0
RECOVERY_TIMEOUT_S = 600.0
LONG_ANSWER_TOKENS = 160  # long enough to be killed in the middle of on a loaded CPU
MODEL = "smollm2"


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


def both_passing(mesh) -> bool:
    inst = mesh.agent_instances()
    return len(inst) == 2 and all(i["state"] == "passing" for i in inst.values())


def answering(mesh) -> list[str]:
    """The instances Envoy has a request in flight to now (its admin /clusters: rq_active per host;
    the engine agents' canaries do not pass through Envoy)."""
    text = httpx.get(f"http://127.0.0.1:{mesh.plan.port(ENVOY_ADMIN_PORT)}/clusters", timeout=5).text
    names: dict[str, str] = {}
    active: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[2] == "hostname":
            names[parts[0] + parts[1]] = parts[3]
        elif len(parts) == 4 and parts[2] == "rq_active":
            active[parts[0] + parts[1]] = int(parts[3])
    known = set(mesh.healthy["instances"])
    return sorted({names[h] for h, n in active.items() if n > 0 and names.get(h) in known})


def test_welcome_settings_and_a_streamed_answer_naming_its_instance(vllm_mesh, page, seen):
    wait_until(lambda: both_passing(vllm_mesh), 900, interval_s=1, what="both engines passing")
    welcome = page.new_chat()  # a chat opened now, both instances passing
    assert f"model {MODEL}: 2 of 2 instances healthy" in welcome, welcome
    assert f"max tokens {UI_MAX_TOKENS}" in welcome, welcome
    page.open_settings()
    assert page.model_options() == [MODEL]  # what the gateway's /v1/models lists
    page.set_temperature(0)
    page.set_max_tokens(str(LONG_ANSWER_TOKENS))
    said = page.confirm_settings()
    assert f"model {MODEL} (2 of 2 instances healthy), temperature 0, max tokens {LONG_ANSWER_TOKENS}" in said
    reply = page.ask("What is the capital of France?", timeout_s=ANSWER_TIMEOUT_S)
    assert "⚠" not in reply.text, reply.text
    assert body_of(reply.text), reply.text
    assert reply.instance in vllm_mesh.healthy["instances"], reply.text
    log = (vllm_mesh.plan.log_dir / "ui.log").read_text()
    assert f"(model {MODEL}, temperature 0, max tokens {LONG_ANSWER_TOKENS})" in log
    seen["first"] = reply.instance


def test_an_answer_cut_by_a_dead_instance_is_resumed_and_says_so(vllm_mesh, page, seen):
    if seen.get("first") is None:
        pytest.fail("the previous test got no first answer")
    killed: dict = {}

    def kill_the_answering_instance(partial: str) -> None:
        """Once the answer shows text: SIGKILL the vLLM that is producing it (a crash, no drain)."""
        if killed or not partial.strip():
            return
        serving = answering(vllm_mesh)
        if len(serving) != 1:
            return
        vllm_mesh.kill_engine(serving[0])
        killed.update(instance=serving[0], shown=len(partial))

    reply = page.ask(
        "Tell me a long story about a lighthouse keeper and a storm.",
        timeout_s=ANSWER_TIMEOUT_S,
        on_partial=kill_the_answering_instance,
    )
    assert killed, f"the answer ended before its instance could be killed: {reply.text}"
    # seen growing (at temperature 0 the first answer, "The capital of France is Paris.", is too short
    # to be caught mid-stream on a loaded machine; this one is 160 tokens)
    assert reply.streamed, f"the answer appeared at once, not streamed: {reply.partials}"
    victim = killed["instance"]
    assert "⚠" not in reply.text and body_of(reply.text), reply.text
    assert "Resumed on another instance" in reply.text, reply.text
    survivor = next(i for i in vllm_mesh.healthy["instances"] if i != victim)
    assert reply.instance == victim and f"resumed on {survivor}" in reply.text, reply.text
    assert f"{victim} stopped after" in reply.text and f"{survivor} continued" in reply.text, reply.text
    # the conversation goes on, whole, with the survivor: question, answer, question, answer, question
    reply = page.ask("And what is the capital of Italy?", timeout_s=ANSWER_TIMEOUT_S)
    assert "⚠" not in reply.text and body_of(reply.text), reply.text
    assert reply.instance == survivor, reply.text
    assert "sending 5 message(s) of conversation" in (vllm_mesh.plan.log_dir / "ui.log").read_text()
    # a new chat now: its welcome counts the one healthy instance left (Consul, read at chat start)
    wait_until(
        lambda: f"model {MODEL}: 1 of 2 instances healthy" in page.new_chat(),
        60,
        interval_s=0.5,
        what="a new chat's welcome counting 1 of 2 instances healthy",
    )
    seen["killed"] = victim


def test_the_killed_instance_is_restarted_and_put_back(vllm_mesh, page, seen):
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
    welcome = page.new_chat()
    assert f"model {MODEL}: 2 of 2 instances healthy" in welcome, welcome
