"""The instances the relay may continue on, and the attempts running on each.

Fed by the gateway agent's snapshot (ads_client.py), the same one Envoy gets. When an instance
leaves it (critical or gone), every attempt still on it that has made no progress for `stall_s`
is rescued: its connection is closed (so nothing keeps running there when a frozen engine thaws)
and its request continues elsewhere. Attempts that are still flowing stay: an instance can leave
the snapshot because its engine agent died (its TTL expired) while the engine serves on.
A draining instance keeps its attempts: the drain exists to let them finish.

Several models: each member serves one model; `models` (from the models' clusters, CDS) names every
model some registered instance serves and its Envoy cluster. `route` says where a request for a
model goes (its cluster, or why not), and a continuation stays on its model's instances.
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Mapping

from agent.gateway.relay.affinity import rank

RESUME_BALANCE = 1.5  # as the edge's hash_balance_factor 150


@dataclass(frozen=True)
class Member:
    instance_id: str
    address: str  # ip:port, as Envoy's endpoint
    healthy: bool  # False: draining (no new work, in-flight finishes)
    priority: int = 0  # its Envoy priority (locality): a continuation goes to the lowest there is
    model: str = ""  # the served model name
    max_model_len: int = 0  # 0: not known

    @property
    def host_override(self) -> str:
        """The value of Envoy's stateful-session header that routes a request to this instance."""
        return base64.b64encode(self.address.encode()).decode()


class Attempt:
    """One upstream request of a client request. `close` is set by the upstream once it is open."""

    __slots__ = ("instance", "last_event_at", "rescued", "close")

    def __init__(self, clock: Callable[[], float]):
        self.instance = ""
        self.last_event_at = clock()
        self.rescued = False
        self.close: Callable[[], Any] | None = None

    def rescue(self) -> None:
        self.rescued = True
        if self.close is not None:
            self.close()


@dataclass(frozen=True)
class Route:
    """Where a request for a model goes: `cluster` ('' = the cluster of every engine: no model
    clusters known yet, or none registered at all), or a refusal (`status`, `message`, `code`)."""

    cluster: str = ""
    model: str = ""  # the model it goes to
    status: int = 0  # 0: routed; else the HTTP status of the refusal
    message: str = ""
    code: str = ""


class Membership:
    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic):
        self.stall_s = stall_s
        self.clock = clock
        self.members: dict[str, Member] = {}
        self.version = ""
        self.models: dict[str, str] = {}  # model -> its Envoy cluster (every registered model)
        self.have_models = False  # the models' clusters arrived once
        self._attempts: dict[str, set[Attempt]] = {}
        self._changed = asyncio.Event()
        self._have_snapshot = False  # before the first one, no instance has left anything

    @property
    def synced(self) -> bool:
        """The first snapshot (endpoints) has arrived."""
        return self._have_snapshot

    # --- the snapshot ---------------------------------------------------------------------------

    def update(self, members: list[Member], version: str = "") -> list[Attempt]:
        """A new snapshot; returns the attempts rescued because their instance left it."""
        self.members = {m.instance_id: m for m in members}
        self.version = version
        self._have_snapshot = True
        self._changed.set()
        self._changed = asyncio.Event()
        return self.sweep()

    def update_models(self, models: Mapping[str, str]) -> None:
        """The models' clusters (CDS): model -> Envoy cluster."""
        self.models = dict(models)
        self.have_models = True

    def route(self, model: object) -> Route:
        """Where a request naming `model` (None: it names none) goes. An unknown model is the OpenAI
        404 (no engine sees it, nothing is ejected); no model is fine while one model is served.
        With one model the cluster of every engine is its cluster (as before several models were
        served: its stats, ejections and affinity table stay where they were); with several, the
        request goes to its model's cluster."""
        if not self.have_models or not self.models:
            return Route()  # nothing known (yet): the engines answer, as with one model
        if len(self.models) == 1:
            (only,) = self.models
            if model is None or model == "" or model == only:
                return Route("", only)
        elif model is None or model == "":
            return Route(
                status=400,
                message=f"this gateway serves several models ({', '.join(sorted(self.models))}): name one in `model`",
                code="model_required",
            )
        if not isinstance(model, str):
            return Route()  # the engine says what is wrong with it
        cluster = self.models.get(model)
        if cluster is None:
            return Route(
                status=404,
                message=f"The model `{model}` does not exist. This gateway serves: {', '.join(sorted(self.models))}.",
                code="model_not_found",
            )
        return Route(cluster, model)

    def served(self) -> dict[str, int]:
        """Models with a healthy instance -> their smallest known max_model_len (0: none known)."""
        out: dict[str, int] = {}
        for m in self.members.values():
            if m.healthy and m.model:
                known = [v for v in (out.get(m.model, 0), m.max_model_len) if v]
                out[m.model] = min(known) if known else 0
        return out

    def sweep(self) -> list[Attempt]:
        """Rescue the stalled attempts on instances that are not in the snapshot (called on every
        update and periodically: an attempt flowing when its instance left may stall later)."""
        if not self._have_snapshot:
            return []
        now = self.clock()
        rescued = []
        for instance, attempts in self._attempts.items():
            if instance in self.members:
                continue
            for a in list(attempts):
                if not a.rescued and now - a.last_event_at >= self.stall_s:
                    a.rescue()
                    rescued.append(a)
        return rescued

    # --- attempts -------------------------------------------------------------------------------

    def track(self, attempt: Attempt, instance: str) -> None:
        attempt.instance = instance
        self._attempts.setdefault(instance, set()).add(attempt)

    def untrack(self, attempt: Attempt) -> None:
        attempts = self._attempts.get(attempt.instance)
        if attempts is not None:
            attempts.discard(attempt)
            if not attempts:
                del self._attempts[attempt.instance]

    def routable(self) -> int:
        """Instances that take new requests (healthy in the snapshot)."""
        return sum(1 for m in self.members.values() if m.healthy)

    def in_flight(self, instance: str) -> int:
        return len(self._attempts.get(instance, ()))

    # --- where a continuation goes --------------------------------------------------------------

    def pick(
        self, excluded: set[str], key: str = "", refused: Mapping[str, str] | None = None, model: str = ""
    ) -> Member | None:
        """A healthy instance of `model` ('' = any) not yet tried by this request, of the nearest
        locality priority that has one (Envoy's priority failover, strictly: a continuation is one
        request): with an affinity key, the first in its rendezvous order (every relay and gateway
        agrees) that is under the load bound (this relay's in-flight attempts, RESUME_BALANCE x the
        mean: the continuations of a dead instance's many streams that share one key must not all
        land on one survivor); else least loaded first."""
        refused = refused or {}
        candidates = [
            m
            for m in self.members.values()
            if m.healthy
            and m.instance_id not in excluded
            and refused.get(m.instance_id) != self.version
            and (not model or m.model in (model, ""))  # "": an engine registered without model meta
        ]
        if not candidates:
            return None
        nearest = min(m.priority for m in candidates)  # the gateway's zone, then its datacenter, then others
        candidates = [m for m in candidates if m.priority == nearest]
        if key:
            total = sum(self.in_flight(m.instance_id) for m in candidates)
            bound = math.ceil(RESUME_BALANCE * (total + 1) / len(candidates))
            for iid in rank(key, (m.instance_id for m in candidates)):
                if self.in_flight(iid) < bound:
                    return self.members[iid]
        least = min(self.in_flight(m.instance_id) for m in candidates)
        return random.choice([m for m in candidates if self.in_flight(m.instance_id) == least])

    async def wait_pick(
        self,
        excluded: set[str],
        timeout_s: float,
        key: str = "",
        refused: Mapping[str, str] | None = None,
        model: str = "",
    ) -> Member | None:
        """`pick`, waiting up to timeout_s for an instance to come (back) into the snapshot; an
        instance in `refused` is a candidate again once the snapshot has changed since it refused."""
        deadline = self.clock() + timeout_s
        while True:
            member = self.pick(excluded, key, refused, model)
            if member is not None:
                return member
            left = deadline - self.clock()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return None
