"""Overload: how many requests this relay sends to the engines at once, and the queue before that.

When every instance has `instance_concurrency` requests of this gateway in flight, a new request
waits here (not in vLLM's own waiting queue, where it would hold a connection and tell nobody) in
a bounded queue: at most `queue_size` waiting, each at most `queue_timeout_s`. Beyond either bound
it gets 503 with Retry-After at once, which the OpenAI SDK retries. Waiting requests are admitted
round-robin by API key, so one key's burst does not starve the others' requests.

The limit is per relay process: capacity = ceil(instance_concurrency x routable instances / relay
processes) (Envoy balances requests over the relays by least-request). Each gateway counts its own
requests: with several gateways an instance can get several gateways' shares (docs/gateway.md).
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionPolicy:
    instance_concurrency: int = 256  # 0: no limit, no queue
    queue_size: int = 256
    queue_timeout_s: float = 30.0
    relay_processes: int = 1


class Overloaded(Exception):
    def __init__(self, reason: str, retry_after_s: int):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(self, policy: AdmissionPolicy, instances: Callable[[], int]):
        self.policy = policy
        self.instances = instances  # routable instances now (the relay's snapshot)
        self.in_use = 0
        self._queues: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()  # key -> waiters, in turn

    @property
    def capacity(self) -> int:
        p = self.policy
        return max(math.ceil(p.instance_concurrency * self.instances() / max(p.relay_processes, 1)), 1)

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def acquire(self, key: str) -> None:
        """Take a slot, waiting in the queue if there is none; Overloaded when the queue is full or
        the wait times out."""
        if self.policy.instance_concurrency <= 0:
            self.in_use += 1
            return
        if self.in_use < self.capacity and not self._queues:
            self.in_use += 1
            return
        if self.waiting >= self.policy.queue_size:
            raise Overloaded(
                f"every instance is busy and {self.waiting} requests are waiting: try again shortly",
                self._retry_after(),
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.policy.queue_timeout_s)
        except TimeoutError:
            if fut.done():  # admitted just as the wait ended: keep the slot
                return
            fut.cancel()
            self._drop(key, fut)
            raise Overloaded(
                f"every instance stayed busy for {self.policy.queue_timeout_s:g}s: try again shortly",
                self._retry_after(),
            ) from None
        except asyncio.CancelledError:  # the client went away while waiting
            if fut.done() and not fut.cancelled():
                self.release()
            else:
                fut.cancel()
                self._drop(key, fut)
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._admit()

    def wake(self) -> None:
        """Capacity may have grown (an instance joined): admit who fits."""
        self._admit()

    def _admit(self) -> None:
        while self._queues and self.in_use < self.capacity:
            key, queue = next(iter(self._queues.items()))
            fut = queue.popleft()
            if queue:
                self._queues.move_to_end(key)  # round-robin: this key's next waiter goes to the back
            else:
                del self._queues[key]
            if not fut.done():
                self.in_use += 1
                fut.set_result(None)

    def _drop(self, key: str, fut: asyncio.Future[None]) -> None:
        queue = self._queues.get(key)
        if queue is not None and fut in queue:
            queue.remove(fut)
            if not queue:
                del self._queues[key]

    def _retry_after(self) -> int:
        return max(1, min(30, math.ceil(self.policy.queue_timeout_s / 4)))
