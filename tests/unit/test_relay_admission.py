"""The relay's overload queue (agent/gateway/relay/admission.py)."""

from __future__ import annotations

import asyncio

import pytest

from agent.gateway.relay.admission import Admission, AdmissionPolicy, Overloaded


def run(coro):
    return asyncio.run(coro)


def test_capacity_is_the_per_instance_limit_times_the_instances_shared_by_the_relays():
    a = Admission(AdmissionPolicy(instance_concurrency=4, relay_processes=2), lambda: 3)
    assert a.capacity == 6
    assert Admission(AdmissionPolicy(instance_concurrency=4), lambda: 0).capacity == 1


def test_beyond_capacity_requests_wait_and_are_admitted_as_slots_free():
    async def scenario():
        a = Admission(AdmissionPolicy(instance_concurrency=2, queue_size=10, queue_timeout_s=5), lambda: 1)
        await a.acquire("k")
        await a.acquire("k")
        waiter = asyncio.create_task(a.acquire("k"))
        await asyncio.sleep(0)
        assert not waiter.done() and a.waiting == 1
        a.release()
        await asyncio.wait_for(waiter, 1)
        assert a.in_use == 2 and a.waiting == 0

    run(scenario())


def test_a_full_queue_and_a_wait_past_the_timeout_are_overloaded_with_retry_after():
    async def scenario():
        a = Admission(AdmissionPolicy(instance_concurrency=1, queue_size=1, queue_timeout_s=0.05), lambda: 1)
        await a.acquire("k")
        waiter = asyncio.create_task(a.acquire("k"))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as full:
            await a.acquire("k")
        assert full.value.retry_after_s >= 1
        with pytest.raises(Overloaded, match="stayed busy"):
            await waiter
        assert a.waiting == 0 and a.in_use == 1

    run(scenario())


def test_waiting_requests_are_admitted_round_robin_by_key():
    async def scenario():
        a = Admission(AdmissionPolicy(instance_concurrency=1, queue_size=10, queue_timeout_s=5), lambda: 1)
        await a.acquire("x")
        order = []

        async def one(key, i):
            await a.acquire(key)
            order.append(f"{key}{i}")

        tasks = [asyncio.create_task(one("burst", i)) for i in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(one("other", 0)))
        await asyncio.sleep(0)
        for _ in range(4):
            a.release()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order == ["burst0", "other0", "burst1", "burst2"]  # the other key did not wait for the burst

    run(scenario())


def test_a_client_that_leaves_while_waiting_frees_its_place():
    async def scenario():
        a = Admission(AdmissionPolicy(instance_concurrency=1, queue_size=5, queue_timeout_s=5), lambda: 1)
        await a.acquire("k")
        waiter = asyncio.create_task(a.acquire("k"))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert a.waiting == 0
        a.release()
        assert a.in_use == 0

    run(scenario())


def test_zero_means_no_limit():
    async def scenario():
        a = Admission(AdmissionPolicy(instance_concurrency=0), lambda: 1)
        for _ in range(1000):
            await a.acquire("k")
        assert a.in_use == 1000

    run(scenario())
