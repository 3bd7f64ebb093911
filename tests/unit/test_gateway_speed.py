from agent.gateway.speed import SpeedWeights, weight_class

ABC = ("a", "b", "c")


def test_weight_classes_and_their_band():
    assert [weight_class(s) for s in (1.2, 0.8, 0.5, 0.33, 0.1)] == [100, 100, 50, 25, 10]
    assert weight_class(0.65, current=100) == 100  # just below 0.7: stays
    assert weight_class(0.55, current=100) == 50
    assert weight_class(0.75, current=50) == 50  # just above 0.7: stays
    assert weight_class(0.85, current=50) == 100


def test_a_slow_instance_gets_a_smaller_weight_only_after_readings_agree():
    w = SpeedWeights(hold=3)
    even = {"a": 30.0, "b": 32.0, "c": 29.0}
    skew = {"a": 30.0, "b": 32.0, "c": 95.0}  # c ~3x slower than the median
    assert not w.update(ABC, even) and w.weight("c") == 100
    assert not w.update(ABC, skew) and not w.update(ABC, skew)  # two readings: not yet
    assert w.update(ABC, skew) and w.weight("c") == 25 and w.weight("a") == 100
    assert not w.update(ABC, skew)  # no change, no republish
    assert not w.update(ABC, even) and not w.update(ABC, skew)  # a fast reading in between restarts the count
    for _ in range(3):
        changed = w.update(ABC, even)
    assert changed and w.weight("c") == 100


def test_an_agent_that_does_not_answer_leaves_its_instances_weight():
    w = SpeedWeights(hold=1)
    assert w.update(ABC, {"a": 30.0, "b": 30.0, "c": 95.0}) and w.weight("c") == 25
    assert not w.update(ABC, {"a": 30.0, "b": 30.0})  # c's agent did not answer
    assert w.weight("c") == 25
    assert not w.update(ABC, {"a": 30.0})  # one reading: nothing to compare, nothing changes
    assert w.weight("c") == 25


def test_an_instance_that_leaves_is_forgotten_and_a_noisy_reading_moves_nothing():
    w = SpeedWeights(hold=3)
    w.update(ABC, {"a": 30.0, "b": 30.0, "c": 30.0})
    assert not w.update(ABC, {"a": 30.0, "b": 30.0, "c": 300.0})
    assert not w.update(ABC, {"a": 30.0, "b": 30.0, "c": 30.0})
    assert w.weight("c") == 100
    slow = SpeedWeights(hold=1)
    slow.update(ABC, {"a": 10.0, "b": 10.0, "c": 100.0})
    assert slow.weight("c") == 10
    assert slow.update(("a", "b"), {"a": 10.0, "b": 10.0})  # c left the catalog
    assert slow.weights == {"a": 100, "b": 100}
