"""The verdict is a pure function of facts: every state and reason a user can see in Consul."""

from dataclasses import replace

import pytest

from agent.catalog.base import CheckStatus, Verdict, VerdictState
from agent.engine.verdict import CanaryFacts, Facts, Policy, ProcessFacts, decide

POLICY = Policy(stall_after_s=8.0, startup_timeout_s=600.0, canary_timeout_s=3.0)
HEALTHY = Facts(
    now_s=1000.0, started_at_s=900.0, process=ProcessFacts(running=True), health_ok=True, health_error="",
    running=2, waiting=0, stalled_for_s=0.0,
    canary=CanaryFacts(ever_succeeded=True, last_ok=True, last_latency_s=0.05),
)


def test_healthy_engine_is_passing():
    v = decide(HEALTHY, POLICY)
    assert v.state is VerdictState.PASSING
    assert v.check_status is CheckStatus.PASSING


def test_not_passing_until_first_canary_even_if_health_is_200():
    f = replace(HEALTHY, canary=CanaryFacts())
    v = decide(f, POLICY)
    assert v.state is VerdictState.STARTING
    assert v.check_status is CheckStatus.CRITICAL  # starting instances get no traffic
    assert "canary" in v.reason


def test_loading_model_is_starting_not_critical():
    f = replace(HEALTHY, health_ok=False, health_error="connection refused", canary=CanaryFacts())
    v = decide(f, POLICY)
    assert v.state is VerdictState.STARTING
    assert "loading model (100s)" == v.reason


def test_startup_timeout_turns_critical_with_the_cause():
    f = replace(HEALTHY, now_s=2000.0, started_at_s=1000.0, health_ok=False, health_error="HTTP 500",
                canary=CanaryFacts())
    v = decide(f, POLICY)
    assert v.state is VerdictState.CRITICAL
    assert "not ready 1000s after start (HTTP 500)" == v.reason


def test_gray_failure_health_200_but_canary_fails_without_progress_is_critical():
    f = replace(HEALTHY, canary=CanaryFacts(ever_succeeded=True, last_ok=False, last_error="no token within 3s"))
    v = decide(f, POLICY)
    assert v.state is VerdictState.CRITICAL
    assert v.reason.startswith("hung:")
    assert "no token within 3s" in v.reason and "/health answers" in v.reason


def test_busy_engine_whose_canary_is_late_but_tokens_flow_stays_passing():
    f = replace(HEALTHY, canary=CanaryFacts(ever_succeeded=True, last_ok=False, last_error="no token within 3s",
                                            progress_during_failure=True))
    assert decide(f, POLICY).state is VerdictState.PASSING


def test_canary_late_behind_other_requests_defers_to_the_progress_watchdog():
    late = CanaryFacts(ever_succeeded=True, last_ok=False, last_error="no token within 3s", others_in_flight=3)
    v = decide(replace(HEALTHY, canary=late, stalled_for_s=3.0), POLICY)
    assert v.state is VerdictState.PASSING and v.reason.startswith("busy:")
    v = decide(replace(HEALTHY, canary=late, stalled_for_s=8.5, running=3), POLICY)
    assert v.state is VerdictState.CRITICAL and v.reason.startswith("stuck:")


def test_progress_watchdog():
    assert decide(replace(HEALTHY, stalled_for_s=7.9), POLICY).state is VerdictState.PASSING
    v = decide(replace(HEALTHY, stalled_for_s=9.0, running=3), POLICY)
    assert v.state is VerdictState.CRITICAL
    assert v.reason == "stuck: 3 requests running but no token generated for 9s"


def test_health_failure_after_ready_is_critical():
    v = decide(replace(HEALTHY, health_ok=False, health_error="timed out"), POLICY)
    assert (v.state, v.reason) == (VerdictState.CRITICAL, "/health failed: timed out")


def test_exited_process_and_crash_loop():
    v = decide(replace(HEALTHY, process=ProcessFacts(running=False, exit_code=-9, next_restart_in_s=2.0)), POLICY)
    assert (v.state, v.reason) == (VerdictState.CRITICAL, "engine process exited with code -9; restart in 2s")
    v = decide(replace(HEALTHY, process=ProcessFacts(running=False, exit_code=1, restarts=5, crash_loop=True)),
               POLICY)
    assert v.state is VerdictState.CRITICAL and v.reason.startswith("crash loop: exited 5 times")


def test_draining_wins_and_maps_to_consul_warning():
    v = decide(replace(HEALTHY, draining=True, health_ok=False), POLICY)
    assert v.state is VerdictState.DRAINING
    assert v.check_status is CheckStatus.WARNING
    assert v.reason == "drain requested; 2 running, 0 waiting"


def test_attached_engine_has_no_process_facts():
    assert decide(replace(HEALTHY, process=None), POLICY).state is VerdictState.PASSING


@pytest.mark.parametrize("state", list(VerdictState))
def test_note_round_trips_through_the_catalog(state):
    v = Verdict(state, "some reason: with colon")
    assert Verdict.from_note(v.check_status.value, v.note) == v


def test_foreign_note_falls_back_on_status():
    assert Verdict.from_note("critical", "Agent not live or unreachable").state is VerdictState.CRITICAL
    assert Verdict.from_note("passing", "").state is VerdictState.PASSING


def test_a_check_without_output_yet_is_starting_not_failed():
    # Between registration and the first TTL update the check is critical with no output.
    v = Verdict.from_note("critical", "")
    assert v.state is VerdictState.STARTING and v.check_status is CheckStatus.CRITICAL, v


def test_an_engine_not_spawned_yet_is_starting():
    f = replace(HEALTHY, process=ProcessFacts(running=False, ever_started=False), health_ok=None,
                canary=CanaryFacts())
    v = decide(f, POLICY)
    assert (v.state, v.reason) == (VerdictState.STARTING, "starting the engine process")
    # once spawned, an exit is an exit
    assert decide(replace(f, process=ProcessFacts(running=False, exit_code=1)), POLICY).state is VerdictState.CRITICAL
