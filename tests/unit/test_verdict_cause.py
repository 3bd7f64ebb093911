"""The verdict's cause: a fixed word carried in the Consul note, parsed back by readers, and the only
thing behaviour decides on (metrics labels, `up`'s crash-loop check, status) -- never the prose."""

import threading
from dataclasses import replace

import pytest

from agent.catalog.base import CatalogEntry, CheckStatus, Registration, Verdict, VerdictCause, VerdictState
from agent.catalog.memory import MemoryCatalog
from agent.engine.metrics import EngineAgentMetrics, cause_label
from agent.engine.verdict import CanaryFacts, ProcessFacts, WorkerFacts, decide
from tests.unit.test_verdict import HEALTHY, POLICY

C = VerdictCause


def test_note_is_state_cause_reason_and_readable():
    v = Verdict(VerdictState.CRITICAL, "canary generation failed (no token within 3s)", C.HUNG)
    assert v.note == "critical (hung): canary generation failed (no token within 3s)"
    assert Verdict(VerdictState.PASSING, "", C.OK).note == "passing (ok)"


@pytest.mark.parametrize("cause", list(VerdictCause))
def test_every_cause_round_trips_through_the_note(cause):
    for state in VerdictState:
        v = Verdict(state, "a reason: with a colon (and parentheses)", cause)
        assert Verdict.from_note(v.check_status.value, v.note) == v
        assert CatalogEntry("i", "n", "127.0.0.1", 1, v.check_status, v.note).verdict.cause is cause


def test_notes_without_a_cause_still_read():
    # the gateway's own checks, an older agent's notes, Consul's node checks
    assert Verdict.from_note("critical", "critical: no relay process running") == Verdict(
        VerdictState.CRITICAL, "no relay process running", None
    )
    assert Verdict.from_note("warning", "draining (some_future_cause): x") == Verdict(VerdictState.DRAINING, "x", None)
    serf = Verdict.from_note("critical", "Serf Health Status: Agent not live or unreachable")
    assert serf.state is VerdictState.CRITICAL and serf.cause is None
    assert Verdict.from_note("critical", "").cause is C.REGISTERED


FAILED = CanaryFacts(ever_succeeded=True, last_ok=False, last_error="no token within 3s", timed_out=True)


@pytest.mark.parametrize(
    "facts, state, cause",
    [
        (HEALTHY, VerdictState.PASSING, C.OK),
        (replace(HEALTHY, draining=True), VerdictState.DRAINING, C.DRAINING),
        (
            replace(HEALTHY, process=ProcessFacts(running=False, exit_code=1, restarts=5, crash_loop=True)),
            VerdictState.CRITICAL,
            C.CRASH_LOOP,
        ),
        (replace(HEALTHY, process=ProcessFacts(running=False, exit_code=1)), VerdictState.CRITICAL, C.EXITED),
        (
            replace(HEALTHY, process=ProcessFacts(running=False, stopped_on_purpose=True)),
            VerdictState.CRITICAL,
            C.STOPPED,
        ),
        (
            replace(HEALTHY, process=ProcessFacts(running=False, ever_started=False), canary=CanaryFacts()),
            VerdictState.STARTING,
            C.SPAWNING,
        ),
        (replace(HEALTHY, health_ok=False, canary=CanaryFacts()), VerdictState.STARTING, C.LOADING),
        (replace(HEALTHY, canary=CanaryFacts()), VerdictState.STARTING, C.CANARY_PENDING),
        (replace(HEALTHY, now_s=5000.0, canary=CanaryFacts()), VerdictState.CRITICAL, C.STARTUP_TIMEOUT),
        (
            replace(HEALTHY, health_ok=False, health_error="HTTP 500", health_failures=2),
            VerdictState.CRITICAL,
            C.HEALTH_FAILED,
        ),
        (replace(HEALTHY, stalled_for_s=9.0), VerdictState.CRITICAL, C.STUCK),
        (replace(HEALTHY, running=0, canary=FAILED), VerdictState.CRITICAL, C.HUNG),
        (
            replace(HEALTHY, worker=WorkerFacts(stopped=("VLLM::Worker (pid 7)",), stopped_for_s=3.0)),
            VerdictState.CRITICAL,
            C.HUNG,
        ),
        (replace(HEALTHY, worker=WorkerFacts(compute_known=True, idle_for_s=3.0)), VerdictState.CRITICAL, C.HUNG),
        (replace(HEALTHY, canary=replace(FAILED, progress_during_failure=True)), VerdictState.PASSING, C.BUSY),
        (
            replace(HEALTHY, running=0, canary=replace(FAILED, metrics_read=False, consecutive_failures=1)),
            VerdictState.PASSING,
            C.CONFIRMING,
        ),
    ],
)
def test_every_rule_of_decide_names_its_cause(facts, state, cause):
    v = decide(facts, POLICY)
    assert (v.state, v.cause) == (state, cause), v
    assert not v.reason.startswith(f"{cause.value}:")  # the cause is in the note's head, not repeated


def test_the_critical_metric_is_labelled_by_cause_not_by_the_reason_text():
    assert cause_label(Verdict(VerdictState.CRITICAL, "canary generation failed", C.HUNG)) == "hung"
    assert cause_label(Verdict(VerdictState.CRITICAL, "exited 5 times", C.CRASH_LOOP)) == "crash_loop"
    assert cause_label(Verdict(VerdictState.CRITICAL, "hung: looks like prose", None)) == "other"
    metrics = EngineAgentMetrics()
    assert metrics.critical._labelnames == ("instance_id", "reason")


def _mesh_with(tmp_path, verdict: Verdict):
    from agent.local.mesh import Console, Mesh
    from agent.local.plan import MeshPlan

    mesh = Mesh(
        MeshPlan(engines=1, ui=False, prometheus=False, run_dir=tmp_path),
        Console(json_mode=True),
        threading.Event(),
        threading.Event(),
    )
    cat = MemoryCatalog()
    cat.register(Registration(mesh.plan.service, "ernie-x-8001", "127.0.0.1", 8001), verdict)
    mesh.catalog = cat
    return mesh


def test_up_stops_waiting_on_the_crash_loop_cause_whatever_the_reason_says(tmp_path):
    from agent.local.mesh import StartError

    mesh = _mesh_with(tmp_path, Verdict(VerdictState.CRITICAL, "exited 5 times (last exit code 1)", C.CRASH_LOOP))
    with pytest.raises(StartError, match="exited 5 times"):
        mesh.wait_engines(timeout_s=30)
    # prose that mentions a crash loop is not one
    mesh = _mesh_with(tmp_path, Verdict(VerdictState.CRITICAL, "engine said: crash loop?", C.EXITED))
    with pytest.raises(StartError, match="not reached within"):
        mesh.wait_engines(timeout_s=0.5)


def test_status_json_keeps_its_fields_and_adds_the_cause():
    from agent.status import _instance_row, render

    v = Verdict(VerdictState.CRITICAL, "canary generation failed", C.HUNG)
    row = _instance_row(CatalogEntry("ernie-n-1", "n", "127.0.0.1", 1, CheckStatus.CRITICAL, v.note), {})
    assert row["verdict"] == "critical" and row["reason"] == "canary generation failed" and row["cause"] == "hung"
    assert row["consul_status"] == "critical"
    text = render({"service": "ernie", "consul": "c", "passing": 0, "instances": [row], "gateways": []})
    assert "CAUSE" in text and " hung " in text
