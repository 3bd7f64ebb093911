"""Real vLLM (CPU build, the embedded default model) behind the engine agent: one engine for the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.local.defaults import DEFAULT_SERVED_MODEL_NAME, vllm_engine
from agent.local.ports import free_port
from agent.model import prepare_default_model
from tests.integration.engine_support import EngineAgent

E2E_SERVICE = "ernie-e2e"
E2E_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e carries the e2e marker (select or deselect them with -m)."""
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


VLLM_START_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def default_model():
    return prepare_default_model()


@pytest.fixture(scope="session")
def vllm_agent(consul_session, default_model, tmp_path_factory):
    """An engine agent supervising one real vLLM server; records the states Consul showed during start-up."""
    port = free_port()
    agent = EngineAgent(
        tmp_path_factory.mktemp("e2e-engine"),
        consul_session.address,
        E2E_SERVICE,
        engines=[vllm_engine(port, str(default_model), DEFAULT_SERVED_MODEL_NAME)],
        drain_deadline_s=120,
    )
    agent.engine_port = port
    agent.iid = agent.instance_id(port)
    agent.start()
    seen, reasons = [], []

    def record():
        e = agent.entries().get(agent.iid)
        if e is not None and (not seen or seen[-1] != e.verdict.state.value):
            seen.append(e.verdict.state.value)
            reasons.append(e.verdict.note)
        return e is not None and e.verdict.state.value == "passing"

    from agent.local.wait import wait_until

    try:
        wait_until(record, VLLM_START_TIMEOUT_S, interval_s=0.2, what="real vLLM passing")
    except TimeoutError:
        agent.stop()
        raise AssertionError(
            f"vLLM never passed; states {seen}\n{agent.proc.log_tail(60)}\n"
            f"engine log:\n{(agent.tmp / 'logs').glob('*')}"
        ) from None
    agent.states_seen, agent.notes_seen = seen, reasons
    yield agent
    agent.stop(timeout_s=180)
