"""The relay's per-key limits: counted per second over the last minute, shared through one file."""

from __future__ import annotations

import json

from agent.gateway.relay.limits import Policies, Policy, UsageWindows


class Wall:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_requests_per_minute_hold_across_processes_and_free_up_a_minute_later(tmp_path):
    wall = Wall()
    a, b = UsageWindows(tmp_path / "usage.json", wall), UsageWindows(tmp_path / "usage.json", wall)  # two relays
    p = Policy(requests_per_minute=3)
    assert [a.admit("k", p).allowed, b.admit("k", p).allowed, a.admit("k", p).allowed] == [True] * 3
    wall.t += 10
    refused = b.admit("k", p)
    assert not refused.allowed and refused.kind == "requests"
    assert refused.retry_after_s == 50  # the first request leaves the window 60 s after it came
    assert dict(refused.headers)["retry-after"] == "50"
    assert b.admit("other", p).allowed  # per key
    wall.t += 50
    assert a.admit("k", p).allowed


def test_tokens_are_counted_when_a_request_ends(tmp_path):
    wall = Wall()
    w = UsageWindows(tmp_path / "usage.json", wall)
    p = Policy(tokens_per_minute=100)
    assert w.admit("k", p).allowed
    w.record_tokens("k", 150)  # a request that started under the limit finishes
    refused = w.admit("k", p)
    assert not refused.allowed and refused.kind == "tokens"
    assert dict(refused.headers)["x-ratelimit-remaining-tokens"] == "0"
    wall.t += 61
    assert w.admit("k", p).allowed


def test_policies_are_reread_when_the_file_changes(tmp_path):
    path = tmp_path / "key-policies.json"
    path.write_text(json.dumps({"a": {"requests_per_minute": 5}}))
    pol = Policies(path)
    assert pol.of("a").requests_per_minute == 5 and not pol.of("b").limited
    path.write_text(json.dumps({"a": {"requests_per_minute": 7, "models": ["m"]}}))
    assert pol.of("a") == Policy(("m",), 7, 0)
