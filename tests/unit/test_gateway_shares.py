from agent.gateway.shares import Shares


def test_shares_are_the_requests_of_the_window_by_instance():
    s = Shares(window_s=60)
    assert s.add(0, {"a": 100, "b": 50}) == {}  # one sample: nothing to compare
    assert s.add(1, {"a": 130, "b": 60}) == {"a": 0.75, "b": 0.25}
    assert s.add(2, {"a": 130, "b": 60, "c": 0}) == {"a": 0.75, "b": 0.25, "c": 0.0}


def test_old_samples_leave_the_window():
    s = Shares(window_s=10)
    s.add(0, {"a": 0, "b": 0})
    s.add(5, {"a": 100, "b": 0})
    s.add(20, {"a": 100, "b": 100})
    assert s.add(21, {"a": 100, "b": 200}) == {"a": 0.0, "b": 1.0}  # only what happened since t=5


def test_a_restarted_envoy_counts_from_zero_and_no_requests_is_no_share():
    s = Shares()
    s.add(0, {"a": 500})
    assert s.add(1, {"a": 500}) == {}
    assert s.add(2, {"a": 3, "b": 1}) == {"a": 0.75, "b": 0.25}
