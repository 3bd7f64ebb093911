"""/proc facts about a supervised engine (pure parsing against sample text) and the progress watch
that turns successive samples into 'stopped for' / 'idle for' (pure timing, no clock)."""

import os

from agent.engine.procfs import CLOCK_TICKS_PER_S, ProcStat, TreeSample, parse_stat, read_tree, tree
from agent.engine.progress import COMPUTE_BUSY_CPU_S_PER_S, WorkerWatch, observe

TAIL = (
    "0 -1 4194304 1655 0 0 0 {utime} {stime} 0 0 20 0 1 0 74700 15872000 3013 18446744073709551615 "
    "94742935212032 94742935212373 140722086342256 0 0 0 0 16781312 2 0 0 0 17 1 0 0 0 0 0"
)


def stat_line(pid, comm, state, ppid, utime=0, stime=0):
    return f"{pid} ({comm}) {state} {ppid} {ppid} 3668 " + TAIL.format(utime=utime, stime=stime)


# A vLLM 0.32 tree as the agent sees it: API server 100 (spawned by the agent, pid 1 here),
# resource tracker 101, EngineCore 102 (title cut to 15 bytes by the kernel), Worker 103.
VLLM_TREE = [
    stat_line(1, "ernie-mesh", "S", 0),
    stat_line(100, "python", "S", 1, 900, 100),
    stat_line(101, "python", "S", 100, 1, 0),
    stat_line(102, "VLLM::EngineCor", "S", 100, 300, 40),
    stat_line(103, "VLLM::Worker", "T", 102, 5000, 200),
    stat_line(200, "bash", "R", 1, 7, 7),  # not ours
]


def test_parse_stat_reads_state_parent_and_cpu_ticks():
    s = parse_stat(stat_line(103, "VLLM::Worker", "T", 102, 5000, 200))
    assert s == ProcStat(pid=103, comm="VLLM::Worker", state="T", ppid=102, cpu_ticks=5200, rss_pages=3013)
    assert s.stopped and s.describe() == "VLLM::Worker (pid 103)"
    assert not parse_stat(stat_line(1, "x", "S", 0)).stopped
    assert parse_stat(stat_line(1, "x", "t", 0)).stopped  # stopped under a tracer


def test_parse_stat_survives_spaces_and_parentheses_in_the_name():
    s = parse_stat(stat_line(7, "a (b) c)", "R", 3, 2, 3))
    assert (s.pid, s.comm, s.state, s.ppid, s.cpu_ticks) == (7, "a (b) c)", "R", 3, 5)


def test_parse_stat_rejects_what_is_not_a_stat_line():
    assert parse_stat("") is None
    assert parse_stat("12 (short) S 1 2") is None
    assert parse_stat("x (name) S 1 " + TAIL.format(utime=1, stime=1)) is None


def test_parse_stat_reads_this_process():
    with open(f"/proc/{os.getpid()}/stat") as f:
        s = parse_stat(f.read())
    assert s.pid == os.getpid() and s.ppid == os.getppid() and s.state in "RS"
    with open(f"/proc/{os.getpid()}/statm") as f:
        resident_pages = int(f.read().split()[1])
    assert abs(s.rss_pages - resident_pages) <= max(resident_pages // 10, 256)  # the same figure, a moment apart


def test_tree_sums_cpu_and_memory_of_every_engine_process():
    """What the agent exports as ernie_engine_cpu_seconds_total / ernie_engine_memory_rss_bytes: the API
    server and all its descendants (not the agent, not a stranger)."""
    t = tree([parse_stat(line) for line in VLLM_TREE], 100)
    assert t.cpu_s == (1000 + 1 + 340 + 5200) / CLOCK_TICKS_PER_S
    assert t.rss_bytes == 4 * 3013 * os.sysconf("SC_PAGE_SIZE")
    gone = tree([parse_stat(line) for line in VLLM_TREE], 999)
    assert gone.root is None and gone.cpu_s == 0 and gone.rss_bytes == 0


def test_tree_finds_all_descendants_and_their_compute_cpu():
    t = tree([parse_stat(line) for line in VLLM_TREE], 100)
    assert t.root.pid == 100
    assert [p.pid for p in t.children] == [101, 102, 103]
    assert t.stopped == ("VLLM::Worker (pid 103)",)
    # the API server's own 1000 ticks are left out: our probes keep it busy
    assert t.compute_cpu_s == (1 + 340 + 5200) / CLOCK_TICKS_PER_S


def test_a_process_without_children_has_no_compute_facts_but_can_be_stopped():
    t = tree([parse_stat(stat_line(100, "python", "T", 1, 50, 5))], 100)
    assert t.compute_cpu_s is None  # a simulated engine: one process, HTTP and "model" together
    assert t.stopped == ("python (pid 100)",)
    gone = tree([parse_stat(line) for line in VLLM_TREE], 999)
    assert gone.root is None and gone.children == () and gone.stopped == ()


def test_read_tree_reads_a_real_child():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        t = read_tree(os.getpid())
        assert child.pid in [p.pid for p in t.children]
        assert t.root.pid == os.getpid() and t.compute_cpu_s is not None
    finally:
        child.communicate(b"")


# --- the progress watch ---------------------------------------------------------------------------


def sample(cpu_ticks, stopped=False, children=True):
    kids = (ProcStat(103, "VLLM::Worker", "T" if stopped else "S", 100, cpu_ticks),) if children else ()
    return TreeSample(ProcStat(100, "python", "S", 1, 10_000), kids)


def run(samples, work_since_s):
    """Fold (time, TreeSample) pairs; returns the facts after each."""
    w, out = None, []
    for t, s in samples:
        w = observe(w, s, t, work_since_s(t) if callable(work_since_s) else work_since_s)
        out.append(w.facts())
    return out


def ticks_per_s(cpu_s_per_s):
    return cpu_s_per_s * CLOCK_TICKS_PER_S


def test_long_prefill_computes_so_it_is_never_idle():
    # a 36 s prefill: vLLM's counters stand still, the Worker uses a core
    busy = ticks_per_s(1.0)
    facts = run([(t, sample(int(t * busy))) for t in range(0, 40)], work_since_s=0.0)
    assert all(f.compute_known and f.idle_for_s == 0.0 for f in facts)


def test_work_in_flight_and_no_computing_counts_idle_time_from_when_the_work_began():
    # frozen Worker (no ticks), the canary sent at t=10.5
    facts = run([(t, sample(500)) for t in (10.0, 11.0, 12.0, 13.0)], work_since_s=10.5)
    assert [f.idle_for_s for f in facts] == [0.0, 0.5, 1.5, 2.5]


def test_idle_polling_ticks_do_not_end_an_idle_run_but_computing_does():
    idle_poll = ticks_per_s(0.02)  # the idle Worker's polling, as measured (2 ticks a second)
    cpu = [0, 1, 2, 3, 4, 104]  # ...then a burst of computing (a core for one second)
    assert idle_poll < ticks_per_s(COMPUTE_BUSY_CPU_S_PER_S)
    cpu = [int(c * idle_poll) if c < 100 else int(4 * idle_poll + ticks_per_s(1.0)) for c in cpu]
    facts = run([(float(t), sample(c)) for t, c in enumerate(cpu)], work_since_s=0.0)
    assert [f.idle_for_s for f in facts] == [0.0, 1.0, 2.0, 3.0, 4.0, 0.0]


def test_nothing_in_flight_is_never_idle():
    facts = run([(float(t), sample(500)) for t in range(5)], work_since_s=None)
    assert all(f.idle_for_s == 0.0 for f in facts)


def test_work_ending_resets_the_idle_run():
    # a canary in flight from t=0, none at t=3, the next one sent at t=3.5
    facts = run(
        [(float(t), sample(500)) for t in range(6)], work_since_s=lambda t: 0.0 if t < 3 else None if t == 3 else 3.5
    )
    assert [f.idle_for_s for f in facts] == [0.0, 1.0, 2.0, 0.0, 0.5, 1.5]


def test_new_processes_with_less_cpu_are_not_idle_time():
    facts = run([(0.0, sample(9000)), (1.0, sample(9000)), (2.0, sample(3))], work_since_s=0.0)
    assert [f.idle_for_s for f in facts] == [0.0, 1.0, 0.0]


def test_stopped_for_counts_from_the_first_sample_that_saw_it_and_resets_on_sigcont():
    stops = [False, True, True, True, False, True]
    facts = run([(float(t), sample(500, stopped=s)) for t, s in enumerate(stops)], work_since_s=None)
    assert [f.stopped_for_s for f in facts] == [0.0, 0.0, 1.0, 2.0, 0.0, 0.0]
    assert facts[1].stopped == ("VLLM::Worker (pid 103)",) and facts[4].stopped == ()


def test_without_children_compute_is_unknown_and_never_idle():
    facts = run([(float(t), sample(0, children=False)) for t in range(4)], work_since_s=0.0)
    assert all(not f.compute_known and f.idle_for_s == 0.0 for f in facts)


def test_watch_facts_are_relative_to_its_own_sample_time():
    w = WorkerWatch(
        at_s=20.0, cpu_s=1.0, idle_since_s=17.5, idle_cpu_s=1.0, stopped_since_s=19.0, stopped=("x (pid 1)",)
    )
    f = w.facts()
    assert (f.idle_for_s, f.stopped_for_s, f.compute_known) == (2.5, 1.0, True)
