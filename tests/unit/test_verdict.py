"""The verdict is a pure function of facts: every state and reason a user can see in Consul."""

from dataclasses import replace

import pytest

from agent.catalog.base import CheckStatus, Verdict, VerdictState
from agent.engine.verdict import CanaryFacts, Facts, Policy, ProcessFacts, WorkerFacts, decide

POLICY = Policy(
    stall_after_s=8.0,
    startup_timeout_s=600.0,
    canary_timeout_s=3.0,
    hang_after_s=2.0,
    health_failures=2,
    canary_failures_blind=2,
)
HEALTHY = Facts(
    now_s=1000.0,
    started_at_s=900.0,
    process=ProcessFacts(running=True),
    health_ok=True,
    health_error="",
    running=2,
    waiting=0,
    stalled_for_s=0.0,
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
    assert "loading model" == v.reason


def test_startup_timeout_turns_critical_with_the_cause():
    f = replace(
        HEALTHY, now_s=2000.0, started_at_s=1000.0, health_ok=False, health_error="HTTP 500", canary=CanaryFacts()
    )
    v = decide(f, POLICY)
    assert v.state is VerdictState.CRITICAL
    assert "not ready within 600s of start (HTTP 500)" == v.reason


def test_gray_failure_health_200_but_canary_fails_without_progress_is_critical():
    f = replace(HEALTHY, canary=CanaryFacts(ever_succeeded=True, last_ok=False, last_error="no token within 3s"))
    v = decide(f, POLICY)
    assert v.state is VerdictState.CRITICAL
    assert v.note.startswith("critical (hung): ")
    assert "no token within 3s" in v.reason and "/health answers" in v.reason


def test_busy_engine_whose_canary_is_late_but_tokens_flow_stays_passing():
    f = replace(
        HEALTHY,
        canary=CanaryFacts(
            ever_succeeded=True, last_ok=False, last_error="no token within 3s", progress_during_failure=True
        ),
    )
    assert decide(f, POLICY).state is VerdictState.PASSING


def test_canary_late_behind_other_requests_defers_to_the_progress_watchdog():
    late = CanaryFacts(ever_succeeded=True, last_ok=False, last_error="no token within 3s", others_in_flight=3)
    v = decide(replace(HEALTHY, canary=late, stalled_for_s=3.0), POLICY)
    assert v.state is VerdictState.PASSING and v.note.startswith("passing (busy):")
    v = decide(replace(HEALTHY, canary=late, stalled_for_s=8.5, running=3), POLICY)
    assert v.state is VerdictState.CRITICAL and v.note.startswith("critical (stuck):")


def test_progress_watchdog():
    assert decide(replace(HEALTHY, stalled_for_s=7.9), POLICY).state is VerdictState.PASSING
    v = decide(replace(HEALTHY, stalled_for_s=9.0, running=3), POLICY)
    assert v.state is VerdictState.CRITICAL
    assert v.reason == "requests running but no token generated for over 8s"


def test_one_health_timeout_is_not_a_verdict_two_are():
    once = replace(HEALTHY, health_ok=False, health_error="timed out", health_failures=1)
    v = decide(once, POLICY)
    assert (v.state, v.reason) == (
        VerdictState.PASSING,
        "canary generation ok; /health failed once (timed out), confirming",
    )
    v = decide(replace(once, health_failures=2), POLICY)
    assert (v.state, v.reason) == (VerdictState.CRITICAL, "/health failed: timed out")


def test_an_exited_process_is_critical_at_once_whatever_else_is_known():
    f = replace(
        HEALTHY,
        process=ProcessFacts(running=False, exit_code=0),
        health_ok=None,
        health_failures=0,
        worker=WorkerFacts(compute_known=True),
    )
    v = decide(f, POLICY)
    assert (v.state, v.reason) == (VerdictState.CRITICAL, "engine process exited with code 0")


def test_exited_process_and_crash_loop():
    v = decide(replace(HEALTHY, process=ProcessFacts(running=False, exit_code=-9, next_restart_in_s=2.0)), POLICY)
    assert (v.state, v.reason) == (VerdictState.CRITICAL, "engine process exited with code -9; restarting")
    v = decide(replace(HEALTHY, process=ProcessFacts(running=False, exit_code=1, restarts=5, crash_loop=True)), POLICY)
    assert v.note == (
        "critical (crash_loop): engine keeps exiting (last exit code 1); retrying at the capped "
        "backoff; see the engine log"
    )
    # a retry that runs is judged like any start (the supervisor ends the crash loop once it stays up)
    v = decide(replace(HEALTHY, process=ProcessFacts(running=True, restarts=6, crash_loop=True)), POLICY)
    assert v.state is VerdictState.PASSING


def test_draining_wins_and_maps_to_consul_warning():
    v = decide(replace(HEALTHY, draining=True, health_ok=False), POLICY)
    assert v.state is VerdictState.DRAINING
    assert v.check_status is CheckStatus.WARNING
    assert v.reason == "drain requested"


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
    f = replace(HEALTHY, process=ProcessFacts(running=False, ever_started=False), health_ok=None, canary=CanaryFacts())
    v = decide(f, POLICY)
    assert (v.state, v.reason) == (VerdictState.STARTING, "starting the engine process")
    # once spawned, an exit is an exit
    assert decide(replace(f, process=ProcessFacts(running=False, exit_code=1)), POLICY).state is VerdictState.CRITICAL


# --- process facts (supervised engines): stopped processes and CPU time ---------------------------

COMPUTING = WorkerFacts(compute_known=True, idle_for_s=0.0)
LATE = CanaryFacts(ever_succeeded=True, last_ok=False, last_error="no token within 3s", timed_out=True)


def test_a_stopped_engine_process_is_hung_after_hang_after_s():
    stopped = ("VLLM::Worker (pid 7)",)
    f = replace(HEALTHY, worker=WorkerFacts(stopped=stopped, stopped_for_s=1.9, compute_known=True))
    assert decide(f, POLICY).state is VerdictState.PASSING  # a stop that short may be a debugger's
    v = decide(replace(f, worker=WorkerFacts(stopped=stopped, stopped_for_s=2.0, compute_known=True)), POLICY)
    assert (v.state, v.reason) == (
        VerdictState.CRITICAL,
        "engine process VLLM::Worker (pid 7) stopped (SIGSTOP) for over 2s",
    )


def test_a_stopped_api_server_is_named_before_its_health_timeouts():
    f = replace(
        HEALTHY,
        health_ok=False,
        health_error="timed out",
        health_failures=2,
        worker=WorkerFacts(stopped=("python (pid 5)",), stopped_for_s=3.0),
    )
    v = decide(f, POLICY)
    assert v.state is VerdictState.CRITICAL
    assert v.note.startswith("critical (hung): engine process python (pid 5) stopped")


def test_work_in_flight_and_model_processes_idle_for_hang_after_s_is_hung():
    f = replace(HEALTHY, running=0, waiting=0, worker=WorkerFacts(compute_known=True, idle_for_s=1.5))
    assert decide(f, POLICY).state is VerdictState.PASSING
    v = decide(replace(f, worker=WorkerFacts(compute_known=True, idle_for_s=2.4)), POLICY)
    assert (v.state, v.reason) == (
        VerdictState.CRITICAL,
        "the canary in flight but the engine's model processes have not computed for over 2s, although /health answers",
    )
    v = decide(replace(f, running=3, waiting=1, worker=WorkerFacts(compute_known=True, idle_for_s=2.4)), POLICY)
    assert v.note.startswith("critical (hung): requests in flight")


def test_long_prefill_no_counter_moves_canary_late_but_worker_computes_is_passing():
    # the ~36 s cold prefill: vLLM showed 0 running, no token counted, the canary timed out behind it
    f = replace(HEALTHY, running=0, waiting=0, stalled_for_s=0.0, canary=LATE, worker=COMPUTING)
    v = decide(f, POLICY)
    assert (v.state, v.reason) == (VerdictState.PASSING, "canary missed its deadline but the model processes compute")
    # without process facts the same facts are a hang (what the agent said before it read /proc)
    assert decide(replace(f, worker=None), POLICY).note.startswith("critical (hung): canary generation failed")


def test_token_stall_while_computing_is_busy_not_stuck():
    f = replace(HEALTHY, running=1, stalled_for_s=30.0, worker=COMPUTING)
    v = decide(f, POLICY)
    assert (v.state, v.reason) == (
        VerdictState.PASSING,
        "no token for over 8s but the model processes compute (long prefill)",
    )
    assert decide(replace(f, worker=None), POLICY).note.startswith("critical (stuck):")


def test_a_canary_answered_with_an_error_is_critical_even_while_computing():
    err = CanaryFacts(ever_succeeded=True, last_ok=False, last_error="HTTP 500: boom")
    v = decide(replace(HEALTHY, canary=err, worker=COMPUTING), POLICY)
    assert v.state is VerdictState.CRITICAL and "HTTP 500: boom" in v.reason


def test_a_canary_timeout_while_metrics_also_timed_out_needs_a_second_failure():
    blind = replace(LATE, metrics_read=False, consecutive_failures=1)
    v = decide(replace(HEALTHY, canary=blind), POLICY)
    assert (v.state, v.reason) == (
        VerdictState.PASSING,
        "canary failed (no token within 3s) while /metrics did not answer; confirming",
    )
    v = decide(replace(HEALTHY, canary=replace(blind, consecutive_failures=2)), POLICY)
    assert v.state is VerdictState.CRITICAL and v.note.startswith("critical (hung): canary generation failed")
    # with /metrics read and showing nothing else in flight, one failure is a fact (as before)
    assert decide(replace(HEALTHY, canary=replace(LATE, consecutive_failures=1)), POLICY).state is VerdictState.CRITICAL
