"""Types shared by everything that talks to the catalog, and the Catalog protocol.

The verdict an engine agent decides travels in Consul as the state of a TTL check:

    verdict   -> check status   (Consul DNS / gateway sees)
    passing   -> passing        healthy endpoint
    draining  -> warning        Envoy DRAINING: no new requests, in-flight ones finish
    starting  -> critical       not routable yet
    critical  -> critical       removed

The check's output carries "<state>: <reason>" so a human reading the Consul UI sees why.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Protocol


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


@dataclass(frozen=True)
class Verdict:
    state: VerdictState
    reason: str = ""

    @property
    def check_status(self) -> CheckStatus:
        return _STATUS_OF_STATE[self.state]

    @property
    def note(self) -> str:
        return f"{self.state.value}: {self.reason}" if self.reason else self.state.value

    @classmethod
    def from_note(cls, status: str, note: str) -> "Verdict":
        """Rebuild a verdict from a check's status and output (what readers of the catalog see).

        A check the engine agent has just registered has no output until its first verdict lands
        (a moment later): that instance is starting, not failed.
        """
        if not note and status == CheckStatus.CRITICAL.value:
            return cls(VerdictState.STARTING, REGISTERED_NO_VERDICT_YET)
        head, _, reason = (note or "").partition(": ")
        try:
            state = VerdictState(head.strip())
        except ValueError:
            state = {
                "passing": VerdictState.PASSING,
                "warning": VerdictState.DRAINING,
            }.get(status, VerdictState.CRITICAL)
            reason = note or ""
        return cls(state, reason.strip())


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
