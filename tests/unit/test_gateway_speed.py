from agent.gateway.speed import SpeedWeights, weight_class


def test_weight_classes():
    assert [weight_class(s) for s in (1.2, 0.8, 0.5, 0.33, 0.1)] == [100, 100, 50, 25, 10]


def test_a_slow_instance_gets_a_smaller_weight_only_after_readings_agree():
    w = SpeedWeights(hold=3)
    even = {"a": 30.0, "b": 32.0, "c": 29.0}
    skew = {"a": 30.0, "b": 32.0, "c": 95.0}  # c ~3x slower than the median
    assert not w.update(even) and w.weight("c") == 100
    assert not w.update(skew) and not w.update(skew)  # two readings: not yet
    assert w.update(skew) and w.weight("c") == 25 and w.weight("a") == 100
    assert not w.update(skew)  # no change, no republish
    assert not w.update(even) and not w.update(skew)  # a fast reading in between restarts the count
    for _ in range(3):
        changed = w.update(even)
    assert changed and w.weight("c") == 100


def test_one_noisy_reading_moves_nothing_and_unknown_latencies_count_as_absent():
    w = SpeedWeights(hold=3)
    w.update({"a": 30.0, "b": 30.0, "c": 30.0})
    assert not w.update({"a": 30.0, "b": 30.0, "c": 300.0})
    assert not w.update({"a": 30.0, "b": 30.0, "c": 30.0})
    assert w.weight("c") == 100
    assert w.update({"a": 30.0}) is True or w.weights == {"a": 100}  # b and c gone: forgotten
    assert w.weights == {"a": 100}


def test_a_single_instance_is_always_full_weight():
    w = SpeedWeights(hold=1)
    w.update({"a": 10.0, "b": 10.0, "c": 100.0})
    assert w.weight("c") == 10
    assert w.update({"c": 100.0}) and w.weight("c") == 100
