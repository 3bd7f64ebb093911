"""Types shared by everything that talks to the catalog, and the Catalog protocol.

The verdict an engine agent decides travels in Consul as the state of a TTL check:

    verdict   -> check status   (Consul DNS / gateway sees)
    passing   -> passing        healthy endpoint
    draining  -> warning        Envoy DRAINING: no new requests, in-flight ones finish
    starting  -> critical       not routable yet
    critical  -> critical       removed

The check's output carries "<state> (<cause>): <reason>", e.g. "critical (hung): canary generation
failed ...": the cause is a fixed word (VerdictCause) that readers parse back and decide on; the
reason is prose for humans, never parsed.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


class CatalogError(Exception):
    """Anything that went wrong talking to the catalog."""


class CatalogUnavailable(CatalogError):
    """The catalog could not be reached (connection refused, timeout, 5xx)."""


class NotRegistered(CatalogError):
    """The catalog does not know the service or check we addressed (e.g. Consul restarted)."""


class VerdictState(str, enum.Enum):
    STARTING = "starting"
    PASSING = "passing"
    DRAINING = "draining"
    CRITICAL = "critical"


class VerdictCause(str, enum.Enum):
    """Why an instance has its verdict: the word behaviour decides on (metrics labels, `up`, status)."""

    # starting
    REGISTERED = "registered"  # in the catalog, the agent's first verdict not landed yet
    SPAWNING = "spawning"  # the engine process is not spawned yet
    LOADING = "loading"  # /health not 200 yet (model loading)
    CANARY_PENDING = "canary_pending"  # /health 200, no canary has succeeded since (re)start
    # passing
    OK = "ok"
    BUSY = "busy"  # canary late behind other work, the engine makes progress
    CONFIRMING = "confirming"  # a canary failure not yet confirmed (/metrics did not answer either)
    # draining
    DRAINING = "draining"
    # critical
    CRASH_LOOP = "crash_loop"
    EXITED = "exited"
    STOPPED = "stopped"  # stopped by the agent
    STARTUP_TIMEOUT = "startup_timeout"  # not ready within startup_timeout_s
    HEALTH_FAILED = "health_failed"
    STUCK = "stuck"
    HUNG = "hung"


class CheckStatus(str, enum.Enum):
    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"


_STATUS_OF_STATE = {
    VerdictState.PASSING: CheckStatus.PASSING,
    VerdictState.DRAINING: CheckStatus.WARNING,
    VerdictState.STARTING: CheckStatus.CRITICAL,
    VerdictState.CRITICAL: CheckStatus.CRITICAL,
}


REGISTERED_NO_VERDICT_YET = "registered; the engine agent's first verdict is on its way"

_NOTE_HEAD = re.compile(r"^(?P<state>[a-z]+)(?: \((?P<cause>[a-z_]+)\))?$")


@dataclass(frozen=True)
class Verdict:
    state: VerdictState
    reason: str = ""
    cause: VerdictCause | None = None  # None: a verdict without one (the gateway's own, a foreign note)

    @property
    def check_status(self) -> CheckStatus:
        return _STATUS_OF_STATE[self.state]

    @property
    def note(self) -> str:
        """What the check's output shows: "critical (hung): <reason>" (the cause part only if known)."""
        head = f"{self.state.value} ({self.cause.value})" if self.cause else self.state.value
        return f"{head}: {self.reason}" if self.reason else head

    @classmethod
    def from_note(cls, status: str, note: str) -> Verdict:
        """Rebuild a verdict from a check's status and output (what readers of the catalog see).

        A check the engine agent has just registered has no output until its first verdict lands
        (a moment later): that instance is starting, not failed.
        """
        if not note and status == CheckStatus.CRITICAL.value:
            return cls(VerdictState.STARTING, REGISTERED_NO_VERDICT_YET, VerdictCause.REGISTERED)
        head, _, reason = (note or "").partition(": ")
        m = _NOTE_HEAD.match(head.strip())
        try:
            state = VerdictState(m["state"]) if m else VerdictState(head.strip())
        except ValueError:
            state = {
                "passing": VerdictState.PASSING,
                "warning": VerdictState.DRAINING,
            }.get(status, VerdictState.CRITICAL)
            return cls(state, (note or "").strip())
        cause = None
        if m and m["cause"]:
            try:
                cause = VerdictCause(m["cause"])
            except ValueError:  # a cause this reader does not know (a newer agent): the state still holds
                cause = None
        return cls(state, reason.strip(), cause)


@dataclass(frozen=True)
class Registration:
    """One vLLM server as the engine agent registers it."""

    service: str
    instance_id: str
    address: str
    port: int
    meta: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    ttl_s: float = 10.0
    deregister_critical_after_s: float = 60.0


@dataclass(frozen=True)
class CatalogEntry:
    """One service instance as a reader of the catalog (gateway, status, tests) sees it."""

    instance_id: str
    node: str
    address: str
    port: int
    status: CheckStatus
    note: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    datacenter: str = ""  # the Consul datacenter it is registered in ("" : not said)

    @property
    def verdict(self) -> Verdict:
        return Verdict.from_note(self.status.value, self.note)


class Catalog(Protocol):
    def register(self, reg: Registration, verdict: Verdict) -> None:
        """Create or replace the instance and its TTL check, with an initial verdict."""

    def set_verdict(self, instance_id: str, verdict: Verdict) -> None:
        """Push a verdict to the instance's TTL check. Raises NotRegistered if it is unknown."""

    def deregister(self, instance_id: str) -> None:
        """Remove the instance (and its check). Unknown instances are not an error."""

    def local_instances(self, service: str) -> dict[str, Registration]:
        """Instances of `service` registered on this node's agent, by ID."""

    def instances(self, service: str, index: int = 0, wait_s: float = 0.0) -> tuple[int, list[CatalogEntry]]:
        """All instances of `service` with their health; blocks up to wait_s while index is current."""


class KeyValueStore(Protocol):
    """Consul's KV store, as the API-key commands and the gateway's key watch use it."""

    def kv_tree(self, prefix: str, index: int = 0, wait_s: float = 0.0) -> tuple[int, dict[str, str]]:
        """Every key under `prefix` with its value; blocks up to wait_s while index is current."""

    def kv_put(self, key: str, value: str, only_if_absent: bool = False) -> bool:
        """Write `key`; with only_if_absent, False (nothing written) if it exists."""

    def kv_delete(self, key: str) -> None:
        """Remove `key` (absent is not an error)."""
