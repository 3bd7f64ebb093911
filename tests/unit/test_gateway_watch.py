"""The catalog watch: index rules, content comparison, backoff, settle window (MemoryCatalog)."""

from __future__ import annotations

import threading
import time

from agent.catalog.base import CatalogEntry, CatalogUnavailable, CheckStatus, Registration, Verdict, VerdictState
from agent.catalog.memory import MemoryCatalog
from agent.gateway.watch import CatalogWatch, WatchSettings, WatchUpdate, content_key, next_index

FAST = WatchSettings(
    wait_s=0.2, settle_s=0.02, min_interval_s=0.0, backoff_initial_s=0.01, backoff_max_s=0.04, max_settle_s=0.1
)
PASSING = Verdict(VerdictState.PASSING)


def reg(port: int) -> Registration:
    return Registration("ernie", f"ernie-n-{port}", "127.0.0.1", port)


class Recorder:
    """Records the contents delivered (`calls`) and every update (`updates`, state-only ones too)."""

    def __init__(self):
        self.calls: list[tuple[CatalogEntry, ...]] = []
        self.updates: list[WatchUpdate] = []
        self.event = threading.Event()

    def __call__(self, update: WatchUpdate):
        self.updates.append(update)
        if update.changed:
            self.calls.append(update.entries)
            self.event.set()

    def states(self, i=-1):
        return sorted((e.instance_id, e.status.value) for e in self.calls[i])


def test_next_index_rules():
    assert next_index(0, 5) == 5
    assert next_index(5, 7) == 7
    assert next_index(7, 7) == 7
    assert next_index(7, 3) == 0  # went backwards: start over
    assert next_index(0, 0) == 1  # never 0 after a reply (a 0 would not block)


def test_first_read_is_delivered_and_a_reply_is_not_a_change():
    cat = MemoryCatalog()
    cat.register(reg(8001), PASSING)
    rec = Recorder()
    w = CatalogWatch(cat, "ernie", rec, FAST)
    assert w.step() is True and rec.states() == [("ernie-n-8001", "passing")]
    # the index moves (another service) but the content does not: nothing delivered
    cat.register(Registration("other", "other-1", "127.0.0.1", 9000), PASSING)
    assert w.step() is False and len(rec.calls) == 1
    cat.set_verdict("ernie-n-8001", Verdict(VerdictState.DRAINING, "drain"))
    assert w.step() is True and rec.states() == [("ernie-n-8001", "warning")]


def test_blocking_read_wakes_on_change():
    cat = MemoryCatalog()
    cat.register(reg(8001), PASSING)
    rec = Recorder()
    w = CatalogWatch(cat, "ernie", rec, WatchSettings(wait_s=5.0, settle_s=0.01, min_interval_s=0.0))
    w.step()
    threading.Timer(0.1, lambda: cat.register(reg(8002), PASSING)).start()
    t0 = time.monotonic()
    assert w.step() is True
    assert time.monotonic() - t0 < 2.0  # woke on the change, not at the end of the 5 s wait
    assert [e.instance_id for e in rec.calls[-1]] == ["ernie-n-8001", "ernie-n-8002"]


class ScriptedCatalog:
    """Replies from a script: (index, entries) or an exception; records the indexes asked for."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.asked: list[int] = []

    def instances(self, service, index=0, wait_s=0.0):
        self.asked.append(index)
        reply = self.replies.pop(0) if self.replies else (99, [])
        if isinstance(reply, Exception):
            raise reply
        return reply


def e(iid: str, status=CheckStatus.PASSING) -> CatalogEntry:
    return CatalogEntry(iid, "n", "127.0.0.1", 8000 + int(iid[-1]), status)


def test_index_goes_backwards_resets_to_zero():
    cat = ScriptedCatalog([(10, [e("a1")]), (4, [e("a1")]), (5, [e("a1")])])
    w = CatalogWatch(cat, "ernie", Recorder(), FAST)
    w.step()
    assert w.discontinuity_at is None
    w.step()
    w.step()
    assert cat.asked == [0, 10, 0]  # after 4 < 10 the next query starts from 0
    assert w.index == 5
    assert w.discontinuity_at is not None  # the agent holds absent instances for a while


def test_errors_back_off_and_keep_the_last_content():
    cat = ScriptedCatalog(
        [
            (3, [e("a1")]),
            CatalogUnavailable("down"),
            CatalogUnavailable("down"),
            (3, [e("a1")]),
            (4, [e("a1"), e("a2")]),
        ]
    )
    rec = Recorder()
    errors = []

    class M:
        def watch_error(self):
            errors.append(1)

        def watch_success(self, t):
            pass

    w = CatalogWatch(cat, "ernie", rec, FAST, metrics=M())
    assert w.step() is True
    assert w.step() is False and w.failing_since is not None and not w.healthy
    assert w.step() is False and len(errors) == 2
    assert len(rec.calls) == 1  # nothing delivered during the outage: the last snapshot stays
    assert w.step() is False and w.healthy  # back, same content: still nothing to deliver
    assert w.step() is True and len(rec.calls) == 2
    assert cat.asked[:5] == [0, 3, 0, 0, 3]  # after an error the next read does not block


def test_run_loop_backs_off_exponentially_with_a_cap():
    cat = ScriptedCatalog([CatalogUnavailable("down")] * 50)
    sleeps = []
    w = CatalogWatch(cat, "ernie", Recorder(), FAST)
    real_wait = w.stop_event.wait

    def wait(t):
        sleeps.append(round(t, 3))
        if len(sleeps) >= 6:
            w.stop_event.set()
        return real_wait(0)

    w.stop_event.wait = wait
    w.run()
    assert sleeps[:4] == [0.01, 0.02, 0.04, 0.04]


def test_settle_window_coalesces_a_burst():
    cat = MemoryCatalog()
    for port in (8001, 8002, 8003):
        cat.register(reg(port), PASSING)
    rec = Recorder()
    w = CatalogWatch(cat, "ernie", rec, WatchSettings(wait_s=2.0, settle_s=0.15, min_interval_s=0.0, max_settle_s=1.0))
    w.step()

    def burst():
        for port in (8001, 8002, 8003):
            cat.set_verdict(f"ernie-n-{port}", Verdict(VerdictState.DRAINING, "rolling"))
            time.sleep(0.03)

    threading.Thread(target=burst).start()
    assert w.step() is True
    assert len(rec.calls) == 2  # three changes, one delivery
    assert rec.states() == [(f"ernie-n-{p}", "warning") for p in (8001, 8002, 8003)]


def test_thread_runs_and_stops_promptly():
    cat = MemoryCatalog()
    cat.register(reg(8001), PASSING)
    rec = Recorder()
    w = CatalogWatch(cat, "ernie", rec, WatchSettings(wait_s=30.0, settle_s=0.01)).start()
    assert rec.event.wait(2.0)
    rec.event.clear()
    cat.set_verdict("ernie-n-8001", Verdict(VerdictState.CRITICAL, "dead"))
    assert rec.event.wait(2.0) and rec.states() == [("ernie-n-8001", "critical")]
    cat.available = False
    cat.set_entry_verdict("ernie-n-8001", PASSING)  # wakes the blocked read, which then fails
    deadline = time.monotonic() + 2
    while w.failing_since is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.failing_since is not None
    w.stop(timeout_s=2.0)


def test_content_key_ignores_order_only():
    a = [e("a1"), e("a2")]
    assert content_key(a) == content_key(list(reversed(a)))
    assert content_key(a) != content_key([e("a1"), e("a2", CheckStatus.WARNING)])


def test_callback_errors_do_not_kill_the_loop():
    cat = MemoryCatalog()
    cat.register(reg(8001), PASSING)
    calls = []

    def boom(update):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug in a callback")

    w = CatalogWatch(cat, "ernie", boom, FAST).start()
    cat.set_verdict("ernie-n-8001", Verdict(VerdictState.DRAINING))
    deadline = time.monotonic() + 3
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    w.stop()
    assert len(calls) >= 2


def test_updates_carry_the_watch_state_and_state_changes_are_handed_over():
    cat = ScriptedCatalog(
        [
            (3, [e("a1")]),
            CatalogUnavailable("down"),
            CatalogUnavailable("down"),
            (3, [e("a1")]),
            (4, [e("a1"), e("a2")]),
        ]
    )
    rec = Recorder()
    w = CatalogWatch(cat, "ernie", rec, FAST)
    w.step()
    first = rec.updates[-1]
    assert first.changed and not first.failing and first.discontinuity_at is None
    w.step()  # Consul fails: the consumer learns it, with the content still in force
    failing = rec.updates[-1]
    assert len(rec.updates) == 2 and not failing.changed and failing.failing
    assert failing.last_error == "down" and failing.entries == first.entries
    w.step()  # the same failure again: nothing new to tell
    assert len(rec.updates) == 2
    w.step()  # back, same content: the state moved (a discontinuity), the content did not
    back = rec.updates[-1]
    assert len(rec.updates) == 3 and not back.changed and not back.failing and back.discontinuity_at is not None
    w.step()
    assert rec.updates[-1].changed and rec.updates[-1].discontinuity_at == back.discontinuity_at
    assert len(rec.calls) == 2


def test_index_going_backwards_is_handed_over_even_without_a_change():
    cat = ScriptedCatalog([(10, [e("a1")]), (4, [e("a1")])])
    rec = Recorder()
    w = CatalogWatch(cat, "ernie", rec, FAST)
    w.step()
    w.step()
    assert len(rec.calls) == 1 and rec.updates[-1].discontinuity_at is not None and not rec.updates[-1].changed


def test_a_failure_before_the_first_read_hands_over_no_content():
    rec = Recorder()
    w = CatalogWatch(ScriptedCatalog([CatalogUnavailable("down")]), "ernie", rec, FAST)
    w.step()
    assert rec.calls == [] and rec.updates[-1].failing and rec.updates[-1].entries == ()


class ParkedCatalog:
    """A blocking query that never returns (the local Consul agent sent it to a server that was cut
    off the network), a leader that changes, and non-blocking reads that answer."""

    def __init__(self):
        self.leader_now = "10.0.0.1:8300"
        self.index = 5
        self.entries = [e("a1")]
        self.parked = threading.Event()
        self.release = threading.Event()

    def instances(self, service, index=0, wait_s=0.0):
        if index and wait_s > 1.0:  # the watch's blocking query (not its short settle reads)
            self.parked.set()
            self.release.wait(30)  # parked: no answer, no error
            raise CatalogUnavailable("rpc error making call: EOF")
        return self.index, list(self.entries)

    def leader(self):
        return self.leader_now


def test_a_blocking_query_parked_while_the_leader_changes_is_abandoned_for_a_fresh_read():
    cat = ParkedCatalog()
    rec = Recorder()
    settings = WatchSettings(wait_s=60.0, settle_s=0.01, min_interval_s=0.0, leader_check_s=0.05)
    w = CatalogWatch(cat, "ernie", rec, settings)
    try:
        assert w.step() is True  # the first read (non-blocking)
        done = threading.Event()
        threading.Thread(target=lambda: (w.step(), done.set()), daemon=True).start()
        assert cat.parked.wait(5)
        cat.index, cat.entries = 6, [e("a1"), e("a2")]  # written through the new leader
        time.sleep(0.2)
        assert not done.is_set()  # same leader: the query may be parked for its whole wait
        cat.leader_now = "10.0.0.2:8300"  # elected while the query is parked
        assert done.wait(5), "the parked query was not abandoned when the leader changed"
        assert [x.instance_id for x in rec.calls[-1]] == ["a1", "a2"]
        assert w.index == 6 and w.abandoned == 1
    finally:
        cat.release.set()


def test_a_change_after_a_quiet_spell_is_delivered_without_a_settle_read():
    """Each settle read is a whole-service answer from Consul: only a burst pays for it."""
    cat = MemoryCatalog()
    for port in (8001, 8002):
        cat.register(reg(port), PASSING)
    reads: list[float] = []
    real = cat.instances

    def counting(service, index=0, wait_s=0.0):
        reads.append(wait_s)
        return real(service, index, wait_s)

    cat.instances = counting  # type: ignore[method-assign]
    rec = Recorder()
    settings = WatchSettings(wait_s=2.0, settle_s=0.15, min_interval_s=0.0, max_settle_s=0.3)
    w = CatalogWatch(cat, "ernie", rec, settings)
    assert w.step() is True
    deadline = time.monotonic() + 5
    while time.monotonic() - (w.delivered_at or 0) < settings.max_settle_s:  # a quiet spell
        assert time.monotonic() < deadline
        time.sleep(0.01)
    reads.clear()
    cat.set_verdict("ernie-n-8001", Verdict(VerdictState.DRAINING, "one change"))
    assert w.step() is True
    assert len(reads) == 1, reads  # the read that saw the change, no settle read after it
    assert rec.states() == [("ernie-n-8001", "warning"), ("ernie-n-8002", "passing")]
    cat.set_verdict("ernie-n-8002", Verdict(VerdictState.DRAINING, "right after: a burst"))
    reads.clear()
    assert w.step() is True
    assert len(reads) > 1, reads  # within max_settle_s of the last delivery: settled
