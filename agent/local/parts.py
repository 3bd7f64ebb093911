"""The local mesh's parts as data: one table says what `ernie-mesh up` runs, in which order it starts
and stops the parts, how long each may take to stop, and which deaths are fatal.

`up` starts the parts in `start_order`, watches them (`Need`), stops them in `stop_order`; `ernie-mesh
down`, cleaning up after an `up` that was killed, stops the processes recorded in the state file in
the same order with the same timeouts. A part's processes carry its name in `up`'s bookkeeping and
the state file: `consul`, `gateway`, …, and for a replicated part `engine-agent-1`, `engine-agent-2`, …
(their children are recorded as `engine-agent-1/<command>`: not the part itself, swept at the end).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from agent.local.plan import DRAIN_DEADLINE_S, GATEWAY_DRAIN_DEADLINE_S, MeshPlan

STOP_TIMEOUT_S = 10.0
GATEWAY_STOP_TIMEOUT_S = GATEWAY_DRAIN_DEADLINE_S + 10.0
# An engine agent drains its engine (up to the drain deadline), then stops vLLM and deregisters.
ENGINE_AGENT_STOP_MARGIN_S = 60.0


class Need(Enum):
    """What a part's death means."""

    VITAL = "vital"  # the mesh cannot work without it: its death, starting or running, stops everything
    REQUIRED = "required"  # must start with the mesh; once it is up a death is reported, the rest carries on
    OPTIONAL = "optional"  # the mesh runs without it: its death is reported, never fatal, not even at start


@dataclass(frozen=True)
class Part:
    name: str  # its process's name (a replicated part's are name-1, name-2, …)
    need: Need
    start_order: int
    stop_order: int  # ascending; a replicated part's processes stop all at once
    stop_timeout_s: float  # from SIGTERM until the part's processes are killed
    title: str  # how the stop progress names it
    replicas: int | None = None  # None: one process named `name`; N: name-1 … name-N
    stop_step: str = ""  # the state file's step while it stops (`down` prints it); "" keeps the previous one
    stop_note: str = ""  # said after the title while it stops; {n} is the number of its processes

    @property
    def fatal_while_starting(self) -> bool:
        return self.need is not Need.OPTIONAL

    @property
    def fatal_while_running(self) -> bool:
        return self.need is Need.VITAL

    def process_names(self) -> tuple[str, ...]:
        if self.replicas is None:
            return (self.name,)
        return tuple(f"{self.name}-{i + 1}" for i in range(self.replicas))

    def owns(self, process_name: str) -> bool:
        """`process_name` is one of this part's processes (whatever the number of replicas)."""
        if self.replicas is None:
            return process_name == self.name
        prefix = f"{self.name}-"
        return process_name.startswith(prefix) and process_name[len(prefix) :].isdigit()

    def stop_message(self, n: int) -> str:
        return f"{self.title}: {self.stop_note.format(n=n)}" if self.stop_note else self.title


def mesh_parts(
    engines: int = 1,
    ui: bool = True,
    prometheus: bool = True,
    drain_deadline_s: float = DRAIN_DEADLINE_S,
    dashboard: bool = True,
) -> tuple[Part, ...]:
    """The parts of a mesh, in start order (the defaults: every part a mesh can have). The dashboard
    reads Prometheus: with it, Prometheus is required (it must start), without it optional."""
    table = [
        Part(
            "consul",
            Need.VITAL,
            start_order=1,
            stop_order=5,
            stop_timeout_s=STOP_TIMEOUT_S,
            title="Consul",
            stop_step="stopping Consul",
        ),
        Part(
            "engine-agent",
            Need.REQUIRED,
            start_order=2,
            stop_order=3,
            stop_timeout_s=drain_deadline_s + ENGINE_AGENT_STOP_MARGIN_S,
            title="engine agents",
            replicas=engines,
            stop_step="draining engines",
            stop_note="draining {n} engine(s) (requests in flight finish), then stopping them",
        ),
        Part(
            "gateway",
            Need.VITAL,
            start_order=3,
            stop_order=4,
            stop_timeout_s=GATEWAY_STOP_TIMEOUT_S,
            title="gateway agent and Envoy",
            stop_step="stopping the gateway",
        ),
    ]
    if ui:
        table.append(Part("ui", Need.REQUIRED, start_order=4, stop_order=1, stop_timeout_s=STOP_TIMEOUT_S, title="UI"))
    if prometheus:
        table.append(
            Part(
                "prometheus",
                Need.REQUIRED if dashboard else Need.OPTIONAL,
                start_order=5,
                stop_order=2,
                stop_timeout_s=STOP_TIMEOUT_S,
                title="Prometheus",
            )
        )
    if dashboard and prometheus:
        table.append(
            Part(
                "dashboard",
                Need.REQUIRED,
                start_order=6,
                stop_order=0,
                stop_timeout_s=STOP_TIMEOUT_S,
                title="dashboard",
            )
        )
    return tuple(sorted(table, key=lambda p: p.start_order))


def plan_parts(plan: MeshPlan) -> tuple[Part, ...]:
    """The parts `plan` runs, in start order."""
    return mesh_parts(
        plan.engines,
        ui=plan.ui,
        prometheus=plan.prometheus,
        drain_deadline_s=plan.drain_deadline_s,
        dashboard=plan.dashboard,
    )


def stop_order(parts: tuple[Part, ...]) -> tuple[Part, ...]:
    return tuple(sorted(parts, key=lambda p: p.stop_order))


def part_of(parts: tuple[Part, ...], process_name: str) -> Part | None:
    """The part `process_name` belongs to; None for anything else (a child of a part, the model preparation)."""
    return next((p for p in parts if p.owns(process_name)), None)
