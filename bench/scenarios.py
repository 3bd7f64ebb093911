"""The drills' scenarios: what happens to which engine when, the same for both systems.

Times are relative to the start of the load: the fault at FAULT_AT x duration, its end `hold_s`
later (default HOLD x duration). A scenario runs in its own thread and records FaultEvents on the
monitor; the load runs until the duration has passed and the scenario is done.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from agent.local.procs import ManagedProcess
from bench.engines import PROMPT_OF_DEATH, listening_pid
from bench.keys import AUTH
from bench.load import Result
from bench.monitor import FaultEvent, Monitor
from bench.system import Progress, System

FAULT_AT = 0.25
HOLD = 0.35
ROLLING_AT = 0.15
ROLLING_PAUSE_S = 1.0
# Faults with a length of their own (the default elsewhere: HOLD x the drill's duration).
# slowloris: longer than both systems' 60 s client timeouts, to show what each does at their end.
# crash-loop: long enough for 5 failed starts at the default backoff (1, 2, 4, 8 s) to be a crash loop.
# consul-leader-loss: the dead leader stays down 20 s (an election takes seconds; what matters is
# the mesh serving through it), then starts again as systemd's Restart=on-failure would bring it.
NOMINAL_HOLD_S = {
    "consul-slow": 20.0,
    "slowloris": 65.0,
    "crash-loop": 40.0,
    "consul-leader-loss": 20.0,
    "consul-leader-cut": 20.0,
}
CRASH_SETTLE_S = 2.0  # after the prompt of death's answer: how long engines get to show they died
POISON_TIMEOUT_S = 60.0
PROBE_EVERY_S = 0.05
PROBE_TIMEOUT_S = 2.0
SLOWLORIS_CONNECTIONS = 1000
SLOWLORIS_INTERVAL_S = 1.0


class Aborted(Exception):
    """The drill was interrupted (Ctrl-C) while the scenario waited."""


@dataclass
class Timeline:
    system: System
    monitor: Monitor
    t0: float  # wall clock at load start
    duration_s: float
    hold_s: float
    stop: threading.Event
    progress: Progress
    ready_timeout_s: float
    model: str = ""
    workdir: Path = Path(".")
    slow_connections: int = SLOWLORIS_CONNECTIONS
    recover_wait_s: float = 60.0  # how long after a fault's end recovery is waited for
    extra: dict[str, Any] = field(default_factory=dict)  # a scenario's own figures for the result
    # called with every request's outcome once the load stopped; what they return joins the result
    finish: list[Callable[[list[Result]], dict[str, Any]]] = field(default_factory=list)

    def at(self, rel_s: float) -> float:
        """Sleep until t0 + rel_s; returns the wall time."""
        while True:
            left = self.t0 + rel_s - time.time()
            if self.stop.is_set():
                raise Aborted()
            if left <= 0:
                return time.time()
            self.stop.wait(min(left, 0.2))

    def say(self, msg: str) -> None:
        self.progress(f"[{self.system.name} +{time.time() - self.t0:5.1f}s] {msg}")

    @property
    def fault_at(self) -> float:
        return FAULT_AT * self.duration_s

    @property
    def victim(self) -> int:
        return 1 % self.system.n


def _fault_then_end(
    tl: Timeline, label: str, index: int | None, fault: Callable[[], None], end: Callable[[], None]
) -> None:
    tl.at(tl.fault_at)
    ev = tl.monitor.add(FaultEvent(label, index, time.time()))
    fault()
    tl.say(f"{label}: fault applied")
    tl.at(tl.fault_at + tl.hold_s)
    ev.t_end = time.time()
    end()
    tl.say(f"{label}: fault ended")


def kill(tl: Timeline) -> None:
    i = tl.victim
    _fault_then_end(tl, f"kill -9 engine {i}", i, lambda: tl.system.kill(i), lambda: tl.system.after_kill(i))


def hang(tl: Timeline) -> None:
    i = tl.victim
    _fault_then_end(tl, f"freeze engine {i}", i, lambda: tl.system.freeze(i), lambda: tl.system.thaw(i))


def slow(tl: Timeline) -> None:
    i = tl.victim
    _fault_then_end(tl, f"engine {i} 10x slower", i, lambda: tl.system.slow(i), lambda: tl.system.unslow(i))


def rolling(tl: Timeline) -> None:
    tl.at(ROLLING_AT * tl.duration_s)
    for i in range(tl.system.n):
        if tl.stop.is_set():
            raise Aborted()
        ev = tl.monitor.add(FaultEvent(f"restart engine {i}", i, time.time()))
        tl.system.roll_stop(i)
        tl.say(f"engine {i} stopped")
        tl.system.roll_start(i)
        ev.t_end = time.time()
        tl.system.roll_wait(i, tl.ready_timeout_s)
        tl.say(f"engine {i} back")
        tl.stop.wait(ROLLING_PAUSE_S)


def consul_restart(tl: Timeline) -> None:
    _fault_then_end(
        tl,
        "Consul stopped",
        None,
        lambda: tl.system.control_plane_stop("consul"),
        lambda: tl.system.control_plane_start("consul"),
    )


def gateway_restart(tl: Timeline) -> None:
    _fault_then_end(
        tl,
        "gateway agent killed",
        None,
        lambda: tl.system.control_plane_stop("gateway"),
        lambda: tl.system.control_plane_start("gateway"),
    )


def consul_slow(tl: Timeline) -> None:
    _fault_then_end(
        tl,
        "Consul SIGSTOPped",
        None,
        lambda: tl.system.control_plane_stop("consul-freeze"),
        lambda: tl.system.control_plane_start("consul-freeze"),
    )


def engine_agent_kill(tl: Timeline) -> None:
    """The agent alone is killed; whether its engine lives on (it runs in its own session) or dies
    with it (PR_SET_PDEATHSIG), the load counts what users see. The agent is started again (as
    systemd would) at the fault's end. Recovered once the instance is routed again with the agent
    passing it and the engine it supervises being the one that listens on the port (an engine the
    killed agent left running would answer the new agent's probes while the new agent's own engine
    cannot bind the port)."""
    i = tl.victim
    tl.at(tl.fault_at)
    ev = tl.monitor.add(FaultEvent(f"engine agent {i} killed -9", i, time.time(), scenario_recovers=True))
    engine_pid = tl.system.engine_pid(i)
    ev.notes["agent_pid"] = tl.system.kill_part(f"engine-agent-{i}")
    tl.say(f"engine agent {i} killed (its engine: pid {engine_pid})")
    tl.stop.wait(1.0)
    ev.notes["engine_outlived_agent"] = _alive(engine_pid)
    tl.at(tl.fault_at + tl.hold_s)
    ev.notes["engine_alive_at_fault_end"] = _alive(engine_pid)
    ev.t_end = time.time()
    tl.system.start_engine_agent(i)
    tl.say(f"engine agent {i} started again")
    port = int(tl.system.engine_url(i).rpartition(":")[2])
    while time.time() < ev.t_end + tl.recover_wait_s:
        view = tl.system.agent_view(i) or {}
        pid = view.get("pid")
        if view.get("state") == "passing" and pid is not None and i in tl.monitor.rotation:
            if listening_pid(port) == pid:
                ev.recovered_at = time.time()
                break
        tl.at(time.time() - tl.t0 + 0.2)
    ev.notes["old_engine_alive_at_the_end"] = _alive(engine_pid)
    ev.notes["listening_pid"] = listening_pid(port)
    last = tl.system.agent_view(i) or {}
    ev.notes["agent_view"] = {k: last.get(k) for k in ("state", "cause", "pid")}


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def crash_loop(tl: Timeline) -> None:
    """Engine i killed, and every start fails until the fault ends; its agent keeps retrying."""
    i = tl.victim
    tl.at(tl.fault_at)
    ev = tl.monitor.add(FaultEvent(f"engine {i} fails at every start", i, time.time(), served_before=0.0))
    first = tl.system.agent_view(i) or {}
    tl.system.crash_at_start(i, True)
    tl.say(f"engine {i} killed; it fails at start from now on")
    causes: list[str] = []
    while time.time() < tl.t0 + tl.fault_at + tl.hold_s:
        view = tl.system.agent_view(i) or {}
        cause = view.get("cause")
        if isinstance(cause, str) and (not causes or causes[-1] != cause):
            causes.append(cause)
        tl.at(min(time.time() - tl.t0 + 0.2, tl.fault_at + tl.hold_s))
    last = tl.system.agent_view(i) or {}
    ev.t_end = time.time()
    tl.system.crash_at_start(i, False)
    ev.notes.update(
        {
            "failed_starts": _int(last.get("restarts")) - _int(first.get("restarts")),
            "causes": causes,
            "crash_loop_reported": "crash_loop" in causes,
            "next_retry_in_s": last.get("next_restart_in_s"),
        }
    )
    tl.say(f"engine {i} may start again ({ev.notes})")


def _int(v: object) -> int:
    return v if isinstance(v, int) else 0


def prompt_of_death(tl: Timeline) -> None:
    """One request (not part of the load) whose prompt crashes every engine it reaches. Its client
    must get a clear error once it took at most one more engine; the load must see nothing."""
    tl.at(tl.fault_at)
    pids = [tl.system.engine_pid(i) for i in range(tl.system.n)]
    t = time.time()
    answer = poison_request(tl.system.base_url, tl.model)
    tl.stop.wait(CRASH_SETTLE_S)
    crashed = [i for i in range(tl.system.n) if tl.system.engine_pid(i) != pids[i]]
    tl.extra["poison"] = {**answer, "engines_taken": len(crashed)}
    tl.say(f"prompt of death: {answer}; engines taken: {crashed}")
    for i in crashed:
        ev = tl.monitor.add(FaultEvent(f"engine {i} crashed on the prompt of death", i, t, served_before=0.0))
        ev.t_end = t  # the system brings it back on its own: recovery counts from the crash
    for i in crashed:
        tl.system.restart_crashed(i, t)


def poison_request(base_url: str, model: str) -> dict[str, Any]:
    """A streaming chat completion whose prompt is the prompt of death: what its client saw."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"{PROMPT_OF_DEATH}: this prompt crashes the engine"}],
        "max_tokens": 8,
        "stream": True,
    }
    t0 = time.perf_counter()
    try:
        with httpx.stream(
            "POST", f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=POISON_TIMEOUT_S
        ) as r:
            text = r.read().decode(errors="replace")
            status = r.status_code
    except httpx.HTTPError as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"[:300], "seconds": _since(t0)}
    message = text
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass  # not the OpenAI error shape: the raw body is the message
    return {"status": status, "error": message[:300], "seconds": _since(t0)}


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


def oom_kill(tl: Timeline) -> None:
    """The engine's model process alone SIGKILLed, as the kernel's OOM killer does; both systems
    start a crashed engine again after the same delay (bench.system.CRASH_RESTART_S)."""
    i = tl.victim
    tl.at(tl.fault_at)
    t = time.time()
    ev = tl.monitor.add(FaultEvent(f"engine {i} OOM-killed", i, t, served_before=0.0))
    tl.system.kill_worker(i)
    ev.t_end = t
    tl.say(f"engine {i}'s worker killed -9")
    tl.system.restart_crashed(i, t)


def slowloris(tl: Timeline) -> None:
    """Slow clients (bench/slowloris.py) on the system's URL for the fault's length."""
    out = tl.workdir / f"slowloris-{tl.system.name}.json"
    host_port = tl.system.base_url.split("://", 1)[1]
    cmd = [
        sys.executable,
        "-m",
        "bench.slowloris",
        "--address",
        host_port,
        "--connections",
        str(tl.slow_connections),
        "--interval",
        f"{SLOWLORIS_INTERVAL_S:g}",
        "--out",
        str(out),
    ]
    proc = ManagedProcess("slowloris", cmd, tl.workdir / f"slowloris-{tl.system.name}.log")

    def start() -> None:
        proc.start()

    def end() -> None:
        proc.stop(30.0)
        try:
            tl.extra["slowloris"] = json.loads(out.read_text())
        except (OSError, ValueError) as e:
            raise RuntimeError(f"slowloris wrote no result ({e}): {proc.log_tail(10)}") from e

    try:
        _fault_then_end(tl, f"{tl.slow_connections} slow connections", None, start, end)
    finally:
        if proc.alive():
            proc.stop(5.0)


def relay_kill(tl: Timeline) -> None:
    """One of the gateway's relay processes SIGKILLed; the gateway agent starts another."""
    tl.at(tl.fault_at)
    ev = tl.monitor.add(FaultEvent("a relay process killed -9", None, time.time()))
    ev.notes["pid"] = tl.system.kill_part("relay")
    ev.t_end = ev.t_fault
    tl.say(f"relay pid {ev.notes['pid']} killed")


def envoy_kill(tl: Timeline) -> None:
    """Envoy SIGKILLed: every client connection to it ends. Recovered when a request through the
    gateway's listener is answered again (probed every PROBE_EVERY_S)."""
    tl.at(tl.fault_at)
    ev = tl.monitor.add(FaultEvent("Envoy killed -9", None, time.time(), scenario_recovers=True))
    ev.notes["pid"] = tl.system.kill_part("envoy")
    ev.t_end = ev.t_fault
    tl.say(f"envoy pid {ev.notes['pid']} killed")
    probes = 0
    with httpx.Client(timeout=PROBE_TIMEOUT_S, headers=AUTH) as http:
        while time.time() < ev.t_fault + tl.recover_wait_s:
            if tl.stop.is_set():
                raise Aborted()
            probes += 1
            if _probe(http, tl.system.base_url, tl.model):
                ev.recovered_at = time.time()
                break
            tl.stop.wait(PROBE_EVERY_S)
    ev.notes["probes"] = probes
    tl.say(f"gateway serving again after {ev.recover_s}s")


def _probe(http: httpx.Client, base_url: str, model: str) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    try:
        return http.post(f"{base_url}/v1/chat/completions", json=body).status_code == 200
    except httpx.HTTPError:
        return False


# --- netns drills (bench/netns_mesh.py: hosts as network namespaces) ------------------------------


def _netns(tl: Timeline) -> Any:
    from bench.netns_mesh import NetnsMeshSystem

    if not isinstance(tl.system, NetnsMeshSystem):
        raise TypeError(f"this drill needs the netns mesh, not {tl.system.name}")
    return tl.system


def consul_leader_loss(tl: Timeline) -> None:
    """The Consul leader of a 3-server cluster SIGKILLed; started again at the fault's end."""
    _leader_loss(tl, "kill")


def consul_leader_cut(tl: Timeline) -> None:
    """The Consul leader of a 3-server cluster cut off the network (no RST: what it was serving goes
    silent); its link restored at the fault's end."""
    _leader_loss(tl, "cut")


PROBE_WAIT_S = 30.0  # how long a catalog change made after the election may take to reach Envoy


def _leader_loss(tl: Timeline, how: str) -> None:
    """Seen on the way: seconds until the two others elect a new leader, whether an instance left
    the catalog (read `stale` from a follower) or the gateway's Envoy stopped routing to one (the
    monitor), and how long a catalog change made once the new leader is there takes to reach the
    gateway's Envoy (a draining probe instance: see NetnsMeshSystem.register_probe)."""
    system = _netns(tl)
    tl.at(tl.fault_at)
    old = system.leader_host()
    if old is None:
        raise RuntimeError("no Consul leader before the fault")
    gw = system.gateway_hosts[0]
    watch_errors = system.gateway_metric(gw, "ernie_gateway_consul_watch_errors_total") or 0.0
    verb = "killed -9" if how == "kill" else "cut off the network"
    ev = tl.monitor.add(FaultEvent(f"Consul leader {old} {verb}", None, time.time()))
    ev.notes["killed" if how == "kill" else "cut"] = old
    if how == "kill":
        ev.notes["pid"] = system.kill_consul(old)
    else:
        system.cut(old)
    tl.say(f"Consul leader {old} {verb}")
    new = None
    leader_at = None
    fewest_passing = system.n
    absent: set[str] = set()
    every: set[str] | None = None
    probe_at = probe_seen_at = None
    while time.time() < ev.t_fault + tl.hold_s or (
        (new is None or (probe_seen_at is None and probe_at is not None and time.time() < probe_at + PROBE_WAIT_S))
        and time.time() < ev.t_fault + tl.recover_wait_s
    ):
        if new is None:
            seen = system.leader_host()
            if seen is not None and seen != old:
                new, leader_at = seen, time.time()
                tl.say(f"new Consul leader: {new} after {leader_at - ev.t_fault:.1f}s")
                system.register_probe("leader")
                probe_at = time.time()
        elif probe_seen_at is None and probe_at is not None and system.gateway_lists_probe(gw):
            probe_seen_at = time.time()
            tl.say(f"a catalog change made after the election reached Envoy after {probe_seen_at - probe_at:.1f}s")
        p = system.passing()
        if p is not None:
            p = {k: v for k, v in p.items() if not k.startswith("drill-probe")}
            every = set(p) if every is None else every
            absent |= every - set(p)
            fewest_passing = min(fewest_passing, sum(1 for v in p.values() if v == "passing"))
        tl.at(time.time() - tl.t0 + 0.1)
    system.deregister_probe("leader")
    ev.t_end = time.time()
    if how == "kill":
        system.start_consul(old)
        tl.say(f"Consul server {old} started again")
    else:
        system.restore(old)
        tl.say(f"Consul server {old} back on the network")
    ev.notes.update(
        {
            "new_leader": new,
            "new_leader_s": None if leader_at is None else round(leader_at - ev.t_fault, 2),
            "fewest_passing_in_catalog": fewest_passing,
            "left_the_catalog": sorted(absent),
            # a change written once the new leader was there, until the gateway's Envoy had it
            "change_reached_envoy_s": None
            if probe_at is None or probe_seen_at is None
            else round(probe_seen_at - probe_at, 2),
        }
    )
    tl.extra["detect_s"] = ev.notes["new_leader_s"]
    tl.extra["detect_of"] = "a new Consul leader"

    def finish(_results: list[Result]) -> dict[str, Any]:
        # the gateway's view from the fault to its end (the monitor samples Envoy's /clusters)
        t_end = ev.t_end if ev.t_end is not None else ev.t_fault
        during = [rot for t, rot in tl.monitor.samples if ev.t_fault <= t <= t_end]
        errors = system.gateway_metric(gw, "ernie_gateway_consul_watch_errors_total")
        return {
            "leader_loss": {
                "how": how,
                **ev.notes,
                "gateway_samples": len(during),
                "gateway_samples_not_routing_every_engine": sum(1 for rot in during if len(rot) < system.n),
                "gateway_watch_errors": None if errors is None else int(errors - watch_errors),
            }
        }

    tl.finish.append(finish)


def gateway_host_loss(tl: Timeline) -> None:
    """Two gateway hosts behind one name (Consul DNS); the one most clients are on is cut off the
    network (its link down: no RST, its connections go silent). The clients (bench.load in a host
    of their own, the openai SDK with its retries) must move to the other; only what was in flight
    on the lost one may fail. Recovered when every client had an answer from the survivor after the
    cut."""
    system = _netns(tl)
    load = system.load
    if load is None:
        raise RuntimeError("the drill's clients are not running")
    tl.at(tl.fault_at)
    # The gateway the clients are on is the one lost (with both addresses in the answer, every client
    # here connects to the same one: see gateway_loss_figures' "clients_on_lost_at_cut").
    at = {h: f"{system.address(h)}:{system.gateway_port}" for h in system.gateway_hosts}
    last: dict[int, str] = {}
    deadline = time.time() + CLIENTS_SEEN_WAIT_S
    while len(last) < load.cfg.concurrency:  # which gateway every client is on (its last answer's)
        for r in sorted(load.snapshot(), key=lambda r: r.started):
            if r.servers and r.outcome == "ok":
                last[r.worker] = r.servers[-1]
        if time.time() > deadline:
            raise RuntimeError(f"not every client was served before the cut: {last}")
        tl.at(time.time() - tl.t0 + 0.1)
    lost = max(system.gateway_hosts, key=lambda h: sum(1 for s in last.values() if s == at[h]))
    survivor = next(h for h in system.gateway_hosts if h != lost)
    lost_at, survivor_at = at[lost], at[survivor]
    ev = tl.monitor.add(FaultEvent(f"gateway host {lost} cut off", None, time.time(), scenario_recovers=True))
    ev.t_end = ev.t_fault
    system.cut(lost)
    t_cut = ev.t_fault
    tl.say(f"gateway host {lost} ({lost_at}) cut off; {survivor} ({survivor_at}) remains")
    dns_gone_at = None
    while time.time() < t_cut + tl.recover_wait_s:
        if dns_gone_at is None:
            names = system.resolve()
            if names and system.address(lost) not in names:
                dns_gone_at = time.time()
                tl.say(f"Consul's DNS names {names} only, {dns_gone_at - t_cut:.1f}s after the cut")
        served_at = all_served_by(load.snapshot(), survivor_at, t_cut, load.cfg.concurrency)
        if served_at is not None and dns_gone_at is not None:
            ev.recovered_at = served_at
            break
        tl.at(time.time() - tl.t0 + 0.2)
    tl.say(f"every client served by {survivor} {ev.recover_s}s after the cut")
    tl.extra["detect_s"] = None if dns_gone_at is None else round(dns_gone_at - t_cut, 2)
    tl.extra["detect_of"] = "Consul's DNS no longer naming the lost gateway"
    tl.finish.append(lambda results: {"gateway_loss": gateway_loss_figures(results, t_cut, lost_at, survivor_at)})


CLIENTS_SEEN_WAIT_S = 30.0  # gateway-host-loss: how long the cut waits for every client's first answer


def all_served_by(results: list[Result], server: str, since: float, workers: int) -> float | None:
    """When every client (worker) had completed a request started after `since` on `server`: the
    latest of each client's first such answer; None while a client has had none."""
    first: dict[int, float] = {}
    for r in results:
        if r.outcome == "ok" and r.started >= since and r.servers and r.servers[-1] == server:
            first[r.worker] = min(first.get(r.worker, r.ended), r.ended)
    if len(first) < workers:
        return None
    return max(first.values())


def gateway_loss_figures(results: list[Result], t_cut: float, lost: str, survivor: str) -> dict[str, Any]:
    """What the clients saw: requests in flight on the lost gateway at the cut, those started after
    it, and every other request that did not complete (the goal: none)."""

    def outcomes(rs: list[Result]) -> dict[str, int]:
        return {k: sum(1 for r in rs if r.outcome == k) for k in ("ok", "failed", "truncated")}

    before = [r for r in results if r.started < t_cut]
    last_server: dict[int, str] = {}  # each client's gateway at the cut (that of its attempt under way)
    for r in sorted(before, key=lambda r: r.started):
        if r.servers:
            last_server[r.worker] = r.servers[0] if r.ended > t_cut else r.servers[-1]
    in_flight = [r for r in before if r.ended > t_cut]
    on_lost = [r for r in in_flight if r.servers and r.servers[0] == lost]
    after = [r for r in results if r.started >= t_cut]
    not_ok = [r for r in results if r.outcome != "ok"]
    others = [r for r in not_ok if r not in on_lost]
    return {
        "lost": lost,
        "survivor": survivor,
        "clients_on_lost_at_cut": sum(1 for s in last_server.values() if s == lost),
        "clients": len({r.worker for r in results}),
        "in_flight_on_lost": {"requests": len(on_lost), **outcomes(on_lost), "streams": sum(r.stream for r in on_lost)},
        "after_cut": {
            "requests": len(after),
            **outcomes(after),
            "first_sent_to_lost": sum(1 for r in after if r.servers and r.servers[0] == lost),
            "retried": sum(1 for r in after if len(r.servers) > 1),
        },
        # not ok, and not in flight on the lost gateway at the cut: the goal is none
        "other_not_ok": len(others),
        "not_ok_on_survivor_only": sum(1 for r in not_ok if r.servers and set(r.servers) == {survivor}),
        "other_not_ok_errors": sorted({r.error[:120] for r in others})[:5],
    }


SCENARIOS: dict[str, Callable[[Timeline], None]] = {
    "kill": kill,
    "hang": hang,
    "slow": slow,
    "rolling": rolling,
    "consul-restart": consul_restart,
    "gateway-restart": gateway_restart,
    "consul-slow": consul_slow,
    "engine-agent-kill": engine_agent_kill,
    "crash-loop": crash_loop,
    "prompt-of-death": prompt_of_death,
    "oom-kill": oom_kill,
    "slowloris": slowloris,
    "relay-kill": relay_kill,
    "envoy-kill": envoy_kill,
    "consul-leader-loss": consul_leader_loss,
    "consul-leader-cut": consul_leader_cut,
    "gateway-host-loss": gateway_host_loss,
}
# Drills on hosts made of network namespaces (bench/netns_mesh.py; they need root).
NETNS = frozenset({"consul-leader-loss", "consul-leader-cut", "gateway-host-loss"})
# Scenarios whose fault lasts hold_s (the others are one event: a crash, a kill, a rolling restart).
HELD = frozenset(
    {"kill", "hang", "slow", "consul-restart", "gateway-restart", "consul-slow", "engine-agent-kill"}
    | {"crash-loop", "slowloris", "consul-leader-loss", "consul-leader-cut"}
)
# The baseline has no control plane, no engine agents and no supervisor of its own: those faults
# have no counterpart there.
MESH_ONLY = frozenset(
    {"consul-restart", "gateway-restart", "consul-slow", "engine-agent-kill", "crash-loop", "relay-kill", "envoy-kill"}
    | NETNS
)
VLLM_OK = frozenset({"kill", "hang", "rolling", "consul-restart", "gateway-restart"})
DESCRIPTIONS = {
    "kill": "kill -9 of one engine mid-load; it is started again when the fault ends",
    "hang": "one engine frozen (/health still 200: simulated fault 'hang', or SIGSTOP of vLLM's EngineCore)",
    "slow": "one engine 10x slower (simulated engine only)",
    "rolling": "every engine restarted one after another (mesh: drain via its agent; baseline: plain restart)",
    "consul-restart": "Consul stopped under load, started again (a -dev agent: it comes back empty)",
    "gateway-restart": "the gateway agent killed -9 under load (its Envoy keeps running), started again",
    "consul-slow": "the Consul agent SIGSTOPped under load (20 s by default), then SIGCONT",
    "engine-agent-kill": "one engine's agent killed -9 under load (the TTL path), started again at the fault's end",
    "crash-loop": "one engine killed, then failing at every start until the fault ends (simulated engine only)",
    "prompt-of-death": "one request whose prompt crashes every engine it reaches (simulated engine only)",
    "oom-kill": "one engine's model process alone killed -9 (vLLM: its EngineCore), restarted 1 s later",
    "slowloris": "1,000 connections trickling request headers or bodies while normal clients run",
    "relay-kill": "one of the gateway's resuming relay processes killed -9 under load",
    "envoy-kill": "the gateway's Envoy killed -9 under load: requests lost in flight, seconds until it serves again",
    "consul-leader-loss": "the leader of a 3-server Consul cluster killed -9 under load (hosts in network namespaces)",
    "consul-leader-cut": "the leader of a 3-server Consul cluster cut off the network under load (network namespaces)",
    "gateway-host-loss": "one of two gateway hosts behind one DNS name cut off the network (network namespaces)",
}
