"""The affinity key (agent/gateway/relay/affinity.py): what shares a key, what does not."""

from __future__ import annotations

import pytest

from agent.gateway.relay.affinity import AffinityRecipe, affinity_key, rank

CONV = AffinityRecipe(key="conversation")
SYSTEM = AffinityRecipe()  # the default
SYS = {"role": "system", "content": "You are a careful assistant. " * 40}


def chat(*messages, **kw):
    return {"model": "m", "messages": list(messages), **kw}


def key(body, recipe=CONV, kind="chat", headers=None):
    return affinity_key(recipe, kind, body, headers or {})


def test_every_turn_of_a_conversation_shares_the_first_turns_key():
    first = chat(SYS, {"role": "user", "content": "Plan a trip to Kyoto"})
    later = chat(
        SYS,
        {"role": "user", "content": "Plan a trip to Kyoto"},
        {"role": "assistant", "content": "Day 1: ..."},
        {"role": "user", "content": "And day 2?"},
    )
    assert key(first) and key(first) == key(later)


def test_two_conversations_with_one_system_prompt_differ_by_conversation_and_share_by_system():
    a = chat(SYS, {"role": "user", "content": "Plan a trip to Kyoto"})
    b = chat(SYS, {"role": "user", "content": "Write a haiku"})
    assert key(a) != key(b)
    assert key(a, SYSTEM) == key(b, SYSTEM) != ""


def test_other_system_prompts_or_models_are_other_keys():
    u = {"role": "user", "content": "hi"}
    assert key(chat(SYS, u)) != key(chat({"role": "system", "content": "Other"}, u))
    assert key(chat(SYS, u)) != key({**chat(SYS, u), "model": "other"})


def test_a_session_header_or_the_user_field_names_the_session_whatever_the_prompt():
    a = chat(SYS, {"role": "user", "content": "one"})
    b = chat({"role": "user", "content": "two"})
    h = {"x-session-id": "s-42"}
    assert key(a, headers=h) == key(b, headers=h)
    assert key(a, headers=h) != key(a, headers={"x-session-id": "s-43"})
    assert key({**a, "user": "alice"}) == key({**b, "user": "alice"}) != key({**a, "user": "bob"})
    custom = AffinityRecipe(session_header="x-conversation")
    assert key(a, custom, headers={"x-conversation": "c1"}) == key(b, custom, headers={"x-conversation": "c1"})


def test_content_parts_key_like_the_same_text():
    parts = {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]}
    assert key(chat(SYS, parts)) == key(chat(SYS, {"role": "user", "content": "Hello there"}))


def test_completions_key_on_the_start_of_the_prompt():
    long = "Context: " + "x" * 5000
    r = AffinityRecipe(prefix_chars=4096)
    assert key({"model": "m", "prompt": long + " Q1"}, r, "completion") == key(
        {"model": "m", "prompt": long + " Q2"}, r, "completion"
    )
    assert key({"model": "m", "prompt": "short one"}, r, "completion") != key(
        {"model": "m", "prompt": "short two"}, r, "completion"
    )
    assert key({"model": "m", "prompt": ["batch of one"]}, r, "completion") == key(
        {"model": "m", "prompt": "batch of one"}, r, "completion"
    )
    assert key({"model": "m", "prompt": [1, 2, 3]}, r, "completion") != ""


@pytest.mark.parametrize(
    "body",
    [{"model": "m"}, {"model": "m", "messages": "not a list"}, {"model": "m", "messages": [3]}, {"prompt": ["a", "b"]}],
)
def test_nothing_to_key_on_gives_no_key(body):
    assert key(body) == "" and key(body, kind="completion") == ""


def test_rank_is_one_order_everywhere_and_removing_an_instance_moves_only_its_keys():
    instances = [f"ernie-e{i}" for i in range(5)]
    keys = [f"k{i}" for i in range(2000)]
    first = {k: rank(k, instances)[0] for k in keys}
    assert first == {k: rank(k, list(reversed(instances)))[0] for k in keys}  # order of the input does not matter
    shares = {i: sum(v == i for v in first.values()) / len(keys) for i in instances}
    assert all(0.14 < s < 0.26 for s in shares.values()), shares
    gone = "ernie-e2"
    after = {k: rank(k, [i for i in instances if i != gone])[0] for k in keys}
    moved = [k for k in keys if after[k] != first[k]]
    assert moved and all(first[k] == gone for k in moved)  # only the removed instance's keys moved


def test_by_default_a_system_prompt_is_the_key_and_a_chat_without_one_keys_on_its_start():
    assert AffinityRecipe().key == "system"
    a = chat(SYS, {"role": "user", "content": "one"})
    b = chat(SYS, {"role": "user", "content": "two"}, {"role": "assistant", "content": "x"})
    assert key(a, SYSTEM) == key(b, SYSTEM)
    plain1 = chat({"role": "user", "content": "no system prompt here"})
    plain2 = chat({"role": "user", "content": "another chat"})
    assert key(plain1, SYSTEM) and key(plain1, SYSTEM) != key(plain2, SYSTEM)
    later = chat({"role": "user", "content": "no system prompt here"}, {"role": "assistant", "content": "y"})
    assert key(later, SYSTEM) == key(plain1, SYSTEM)


def test_a_session_or_user_name_is_scoped_by_the_api_key():
    a = chat(SYS, {"role": "user", "content": "one"})
    h = {"x-session-id": "1"}
    assert affinity_key(SYSTEM, "chat", a, h, tenant="alice") != affinity_key(SYSTEM, "chat", a, h, tenant="bob")
    u = {**a, "user": "u1"}
    assert affinity_key(SYSTEM, "chat", u, {}, tenant="alice") != affinity_key(SYSTEM, "chat", u, {}, tenant="bob")
    assert affinity_key(SYSTEM, "chat", a, {}, tenant="alice") == affinity_key(SYSTEM, "chat", a, {}, tenant="bob")
