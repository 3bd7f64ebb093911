"""docs/benchmarks.md and docs/reliability.md from the figures in bench/results/latest.json
(rewritten by `python -m bench`): reliability.md has the failure drills (the chaos matrix and every
drill's figures), benchmarks.md the proxy overhead, propagation and scale."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from collections.abc import Callable

from agent.engine.config import EngineAgentConfig
from bench import report
from bench.report import Figures
from bench.scenarios import DESCRIPTIONS, MESH_ONLY

# The goal of every drill for ernie-mesh (issue 12): 0 failed, 0 truncated; Envoy killed cannot be
# (client connections end at that Envoy): it serves again within this many seconds.
SERVE_AGAIN_GOAL_S = 1.0
CHAOS_ORDER = (
    "kill",
    "oom-kill",
    "hang",
    "slow",
    "rolling",
    "crash-loop",
    "prompt-of-death",
    "engine-agent-kill",
    "consul-restart",
    "consul-slow",
    "gateway-restart",
    "relay-kill",
    "envoy-kill",
    "slowloris",
    "consul-leader-loss",
    "consul-leader-cut",
    "gateway-host-loss",
)
FAULTS = {
    "kill": "engine killed -9 (with its children), back at the fault's end",
    "oom-kill": "engine's model process alone killed -9, restarted 1 s later",
    "hang": "engine frozen, `/health` still 200",
    "slow": "engine 10× slower per token",
    "rolling": "every engine restarted, one after another",
    "crash-loop": "engine killed, then failing at every start",
    "prompt-of-death": "one request whose prompt crashes engines",
    "engine-agent-kill": "engine agent killed -9, started again at the fault's end",
    "consul-restart": "Consul stopped, started again empty",
    "consul-slow": "Consul SIGSTOPped, then SIGCONT",
    "gateway-restart": "gateway agent killed -9, started again",
    "relay-kill": "one resuming relay process killed -9",
    "envoy-kill": "Envoy killed -9",
    "slowloris": "slow connections trickling headers or bodies",
    "consul-leader-loss": "leader of a 3-server Consul cluster killed -9, hosts in network namespaces "
    "(baseline: none — it has no Consul)",
    "consul-leader-cut": "leader of a 3-server Consul cluster cut off the network, hosts in network namespaces "
    "(baseline: none — it has no Consul)",
    "gateway-host-loss": "one of two gateway hosts behind one Consul DNS name cut off the network, hosts in "
    "network namespaces (baseline: not run — one nginx host; with two behind a static name, nothing would "
    "take the lost one out of the name)",
}


def _machine(m: Figures) -> str:
    load = ", ".join(f"{x:.1f}" for x in m.get("loadavg", ()))
    dirty = " with uncommitted changes in the shared checkout" if m.get("dirty") else ""
    return (
        f"{m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}; "
        f"commit {m['commit']}{dirty}; {m['date']}; load average at the end of the part: {load}"
    )


def _row(rows: list[Figures], scenario: str, system: str) -> Figures | None:
    return next((r for r in rows if r["scenario"] == scenario and r["system"] == system), None)


_ENGINE = {f.name: f.default for f in dataclasses.fields(EngineAgentConfig)}  # the engine agent's defaults

SYSTEMS = f"""## What is compared

- **ernie-mesh**: a Consul dev agent; one engine agent per engine (`ernie-mesh engine`, default
  policy: probe every 1 s, a 1-token canary every 1 s with a 3 s deadline; a vLLM engine whose
  model processes are stopped, or do not compute for 2 s while work is in flight, is hung —
  facts from /proc; without them (simulated engines) a stall watchdog of 8 s; TTL
  {_ENGINE["ttl_s"]:g} s (refreshed {_ENGINE["ttl_refresh_s"]:g} s after each write); restart backoff
  {_ENGINE["restart_backoff_initial_s"]:g} s doubling to {_ENGINE["restart_backoff_max_s"]:g} s; drains before
  stopping); one gateway agent (`ernie-mesh gateway`)
  with its Envoy (policy in `envoy/bootstrap.yaml`, see docs/gateway.md: least-request, retries
  of connect-failure / 503 on other hosts, outlier ejection on local-origin failures, no route
  timeout, 10 s to receive request headers and 60 s to receive a whole request, API keys checked:
  the drills' clients send `bench/keys.py`'s) and its **resuming relay** (2 processes: a stream
  whose engine dies, hangs or aborts continues on another instance from the relayed token IDs; a
  request an engine dropped before answering goes to at most one more engine).
- **baseline** (`bench/baseline/`): Debian's nginx with a round-robin `upstream` over the engine
  ports, `proxy_read_timeout 300s`, and `healthcheck.py`, which polls every engine's `/health`
  every 10 s (5 s timeout), rewrites the upstream list to the engines that answered 200 and runs
  `nginx -s reload`. Faithful but fair: it has what a careful naive setup for an LLM API has —
  `proxy_buffering off` (without it SSE tokens arrive in bursts; many naive setups forget it, which
  would only make the baseline look worse), HTTP/1.1 keep-alive to the engines, `worker_processes
  auto` (Envoy also runs one worker per core), engines that crash started again after 1 s (as
  systemd's `Restart=on-failure`, `RestartSec=1` would) — and nothing it would not have: no
  retries of POSTs (nginx's default `proxy_next_upstream error timeout` moves a request to the
  next server only when the connection could not be made), no active health checks, no ejection
  beyond nginx's passive `max_fails=1 fail_timeout=10s`, nginx's default client timeouts
  (`client_header_timeout` and `client_body_timeout` 60 s, the latter between two reads). Engines
  are restarted the plain way (`systemctl restart`: SIGTERM, with vLLM's default
  `--shutdown-timeout 0`, which aborts requests in flight).
- **Same engines, same load**: each system gets its own fresh set of engines (same count, same
  settings), one system after the other. Load: the official `openai` client (`max_retries=0`: we
  measure the serving system, not the client's retry loop), N closed-loop clients, half of the
  requests streaming, `ignore_eos` with `max_tokens` 32 so a short answer is detectable, client
  timeout 60 s (300 s with vLLM).
"""

RELIABILITY_HEAD = (
    """# Reliability: failure drills and the chaos matrix

*Written by `python -m bench` from `bench/results/latest.json`; do not edit by hand.* Every fault
we can name, injected under steady load into ernie-mesh and into the naive nginx design side by
side, and what the users of each saw. The goal for ernie-mesh is 0 failed and 0 truncated
requests in every drill but two: when Envoy or one of the relay processes is killed, the
connections that end at that process are lost with it (a process on the data path takes its
sockets with it; what Envoy had already started answering cannot be retried, and a relay's streams
have no other process that knows them), so those rows count them and the seconds until the part
serves again (goal ≤ 1 s; for the relay also: nothing lost but what it carried).
Every figure comes from one run on a shared 2-core machine where other work was running at the
same time: read the counts (failed, truncated) as exact and the times as those of a noisy machine.

Reproduce: `python -m bench --only drills` (every drill with simulated engines, both systems
where the baseline has the part; about 40 minutes), `python -m bench --only vllm` (kill, hang and
rolling with real vLLM engines), some drills alone with the other rows kept (`python -m bench --drills
consul-leader-loss,consul-leader-cut,gateway-host-loss`, the drills on network namespaces: root
only; a run without root skips them and keeps their rows), or a single drill: `ernie-mesh drill
prompt-of-death --system both --duration 60 --json`. Proxy overhead, propagation and scale are in
[benchmarks.md](benchmarks.md).

"""
    + SYSTEMS
    + """
What the columns mean:

- **failed**: an exception before any content, or a non-2xx status.
- **truncated**: HTTP 200 but an incomplete answer: a stream cut after content arrived, a stream
  without its final chunk (finish_reason and usage), `finish_reason: "abort"`, or fewer tokens
  than asked.
- **stalled**: complete answers that took more than 5× the median (a user waiting on a frozen or
  slow engine).
- **longest wait s**: the longest a user waited on one complete answer beyond the usual: a
  stream's longest silence between two events (the first one included), or a non-streaming
  answer's latency minus the median non-streaming latency.
- **p50 / p99**: latency of the complete answers; **TTFT**: time to the first token of the
  complete streaming answers.
- **detect s**: from the fault to the engine being out of rotation — for the mesh, Envoy's admin
  `/clusters` no longer lists it as healthy (removed, draining or ejected); for the baseline,
  `healthcheck.py` reloaded nginx without it. *never*: it stayed in rotation for the whole fault
  (an engine back within seconds may never have left it). *n/a*: no engine was at fault. For
  rolling, the slowest of the engines.
- **recover s**: from the fault's end (engine started again, unfrozen, control plane back) to
  full recovery: the engine is in rotation again and has completed a request (control plane:
  every engine routable and Consul, the gateway agent and every relay process answering). Faults
  that are one event (a crash, a kill) end when they happen, so their recovery includes the
  restart. For rolling, the slowest. *never*: not within 60 s after the fault's end.
- **goal**: for ernie-mesh, 0 failed and 0 truncated (envoy-kill: serving again ≤ 1 s;
  relay-kill: 0 failed, only the streams the killed relay carried cut, a new relay answering ≤ 1 s).
- *baseline ÷ mesh*: the ratio of the two rows (∞: the mesh had none).

Scenarios (fault at 25 % of the run; a held fault lasts 35 % of it unless said otherwise; rolling
starts at 15 %):
`kill` — kill -9 of one of the engines (and its children); it is started again when the fault ends
(baseline: by hand; mesh: by its engine agent, whose restart backoff is set to the same delay).
`oom-kill` — SIGKILL of the engine's model process alone, as the kernel's OOM killer does (vLLM:
its `EngineCore`; the simulated engine is one process); both systems start it again 1 s later.
`hang` — one engine frozen while `/health` still answers 200 (simulated engine fault `hang`;
with vLLM, SIGSTOP of its `VLLM::EngineCore` process), unfrozen at the fault's end.
`slow` — one engine 10× slower per token. `rolling` — every engine restarted one after another
(mesh: `POST <agent>/drain/<id>`, wait for "drained", restart its agent, wait until Envoy routes
to it again; baseline: plain restart, then wait for `/health` 200 before the next).
`crash-loop` — one engine killed, and every start of it fails (the simulated engine's
`--crash-at-start-if-exists`) for 40 s; its agent keeps retrying (backoff 1 s doubling to 30 s;
the crash loop is reported after 5 exits in 300 s); recovered once a retry comes up and is routed.
`prompt-of-death` — one request, not part of the load, whose prompt crashes every simulated engine
it reaches (`--crash-on-prompt`): its client must get a clear error once it took at most one more
engine; everyone else must see nothing. Both systems start a crashed engine again 1 s later.
`engine-agent-kill` — one engine agent killed -9 (its engine runs in its own session: whether it
lives on or dies with its agent, the load counts what users see); the instance leaves rotation
when its Consul TTL check expires (10 s); the agent is started again at the fault's end, and the
engine counts as recovered once that agent's own engine serves on the port and is routed.
`consul-restart` — Consul stopped, started again empty (a dev agent). `consul-slow` — the Consul
agent SIGSTOPped for 20 s (longer than the TTL), then SIGCONT. `gateway-restart` — the gateway
agent killed -9 (its Envoy keeps running), started again. `relay-kill` — one of the gateway's two
resuming relay processes killed -9; the gateway agent starts another. `envoy-kill` — the
gateway's Envoy killed -9; the gateway agent starts another; recovered when a request through the
gateway is answered again (probed every 50 ms). `slowloris` — 1,000 connections
(`bench/slowloris.py`) that never finish their request, half trickling header lines, half a
body, one piece a second, for 65 s, while the normal clients run.
`consul-leader-loss`, `consul-leader-cut` and `gateway-host-loss` run on hosts made of Linux
network namespaces (`bench/netns_mesh.py`, needs root): real `consul agent` servers and clients
with the Ansible role's settings (without ACLs, TLS and gossip encryption), every agent talking
to its host's local Consul client, the engine agents on one host, each gateway (agent, Envoy,
relays) on a host of its own. `consul-leader-loss` — three Consul servers; the leader killed -9 under load, started
again 20 s later or once the two others elected a new leader, whichever comes later (the clients
run in the drill's own namespace and reach the gateway host's address); *detect s* is the seconds
until a new leader. `consul-leader-cut` — the same with the leader cut off the network (its link
down: what it was serving goes silent, no RST) and restored at the end. Both also time a catalog
change made once the new leader is there: how long the gateway takes to see it.
`gateway-host-loss` — two gateway hosts registered as `ernie-gateway`, one Consul server
answering DNS; the clients run on a host of their own and resolve
`ernie-gateway.service.consul` (port 8080 on every gateway) through Consul's DNS — chosen over a
list of addresses in the client because the name follows the catalog: a lost or drained gateway
leaves the answer without any client changing its configuration. They are the official `openai`
SDK as an application would set it up: its default 2 retries (connection errors, timeouts, 5xx),
a 2 s connect timeout and a 5 s read timeout (a lost host sends no RST: without a read timeout a
request waits for the whole client timeout), one connection per client. The gateway host most
clients are on is cut off the network (its link down); *detect s* is the seconds until Consul's
DNS no longer names it, *recover s* until every client has had an answer from the other gateway;
its goal: nothing fails but the requests in flight on the lost gateway (no client connection
outlives its host). The baseline has no Consul,
engine agents, relay or supervising gateway: """
    + ", ".join(f"`{s}`" for s in sorted(MESH_ONLY))
    + """ run for the mesh only.
"""
)

BENCHMARKS_HEAD = """# Benchmarks: ernie-mesh against the naive nginx design

*Written by `python -m bench` from `bench/results/latest.json`; do not edit by hand.* Every figure
comes from one run on a shared 2-core machine where other work was running at the same time: read
the times as medians of a noisy machine; the ratios matter more than the absolute milliseconds.

**Failure drills** — what users see when engines, Consul, the gateway, its relay or Envoy fail, side
by side with the naive design, and the chaos matrix of every fault — are in
[reliability.md](reliability.md), which also describes the two systems. This document has the
costs: the proxy's overhead, how fast a health change reaches Envoy, and scale.

Reproduce: `python -m bench --only overhead,propagation,scale` (`python -m bench` runs the drills
too). The overhead part alone takes about 20 minutes (26 paths, both modes, 5 rounds);
`python -m bench.overhead --variants "bare 1 worker,stock envoy"` measures a few variants.
"""


SHORTFALL_KILL = """### kill -9 truncated streams

Truncated answers in the `kill` drill: {counts}. Streams in flight on a killed engine are resumed
on another instance by the gateway's relay (docs/gateway.md, "Resuming relay"), so this should be
zero; the errors below say what happened to each. (Before the relay, every stream that had
started on the killed engine was cut: Envoy cannot retry a response that has started.)
"""


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _section(title: str, part: Figures, body: list[str], note: str = "") -> list[str]:
    """One part of the document: title, the machine it ran on, its table, what to read in it."""
    by_machine: dict[str, list[str]] = {}  # rows run on their own (--drills), by the machine line
    for r in part.get("rows", []):
        if r.get("machine"):
            by_machine.setdefault(_machine(r["machine"]), []).append(f"`{r['scenario']}`")
    machines = [
        f"{_and(list(dict.fromkeys(names)))} ran on {'its' if len(set(names)) == 1 else 'their'} own: {m}."
        for m, names in by_machine.items()
    ]
    return [
        title,
        "",
        f"Machine: {_machine(part['machine'])}." + (" " + " ".join(machines) if machines else ""),
        "",
        *body,
        "",
        *([note, ""] if note else []),
    ]


def _drill_body(rows: list[Figures], settings_note: str = "") -> list[str]:
    return [
        report.settings_line(rows) + settings_note,
        "",
        *report.drill_table(rows),
        "",
        "Requests that did not complete in full, by error:",
        "",
        *(report.error_notes(rows) or ["- none"]),
    ]


# --- the chaos matrix -------------------------------------------------------------------------


def goal_met(r: Figures) -> bool:
    serves_again = r["recover_s"] is not None and float(r["recover_s"]) <= SERVE_AGAIN_GOAL_S
    if r["scenario"] == "envoy-kill":
        return serves_again
    if r["scenario"] == "relay-kill":
        return serves_again and int(r["failed"]) == 0 and int(r["truncated"]) <= _lost(r)
    if r["scenario"] == "gateway-host-loss":
        g = r.get("gateway_loss") or {}
        return g.get("other_not_ok") == 0 and g.get("not_ok_on_survivor_only") == 0
    return int(r["failed"]) == 0 and int(r["truncated"]) == 0


def _goal(r: Figures | None) -> str:
    if r is None:
        return "—"
    if r["scenario"] == "envoy-kill":
        wanted = f"serves again ≤ {SERVE_AGAIN_GOAL_S:g} s"
    elif r["scenario"] == "relay-kill":
        wanted = f"0 failed, only its own streams cut, replaced ≤ {SERVE_AGAIN_GOAL_S:g} s"
    elif r["scenario"] == "gateway-host-loss":
        wanted = "only what was in flight on the lost gateway fails"
    else:
        wanted = "0 failed, 0 truncated"
    return f"{wanted}: met" if goal_met(r) else f"{wanted}: **missed**"


def _recover(r: Figures) -> str:
    return "never" if r["recover_s"] is None else f"{r['recover_s']:.1f}"


def _pair(m: Figures | None, b: Figures | None, cell: Callable[[Figures], str]) -> str:
    return f"{cell(m) if m else '—'} / {cell(b) if b else '—'}"


def _held(r: Figures) -> str:
    return f", {r['hold_s']:g} s" if r.get("hold_s") else ""


def chaos_table(rows: list[Figures]) -> list[str]:
    """One row per drill: each cell `mesh / baseline` (— where the baseline has no such part)."""
    out = [
        "| fault | requests | failed | truncated | stalled | detect s | recover s | goal (ernie-mesh) |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    scenarios = [s for s in CHAOS_ORDER if any(r["scenario"] == s for r in rows)]
    scenarios += sorted({r["scenario"] for r in rows} - set(scenarios))
    for s in scenarios:
        m, b = _row(rows, s, "mesh"), _row(rows, s, "baseline")
        first = m or b
        assert first is not None
        out.append(
            f"| `{s}`: {FAULTS.get(s, DESCRIPTIONS.get(s, s))}{_held(first)} | "
            f"{_pair(m, b, lambda r: str(r['requests']))} | {_pair(m, b, lambda r: str(r['failed']))} | "
            f"{_pair(m, b, lambda r: str(r['truncated']))} | {_pair(m, b, lambda r: str(r.get('stalled', '—')))} | "
            f"{_pair(m, b, report.detect_cell)} | {_pair(m, b, _recover)} | {_goal(m)} |"
        )
    return out


def _lost(r: Figures) -> int:
    return sum(e.get("lost_in_flight", 0) for e in r["events"])


def _notes(ev: Figures) -> Figures:
    notes: Figures = ev.get("notes") or {}
    return notes


def _slowloris(r: Figures) -> str:
    s = r.get("slowloris")
    if not s:
        return ""
    parts = []
    for kind, what in (("headers", "trickling headers"), ("body", "trickling a body")):
        k = s[kind]
        closed = k["closed_by_server"]
        how = ", ".join(f"{n} × `{a}`" for a, n in k["answers"].items()) or "no answer"
        when = (
            f"closed by the server after {k['closed_after_s_min']:g}–{k['closed_after_s_max']:g} s ({how})"
            if closed
            else "none closed by the server"
        )
        parts.append(f"{k['opened']} {what}: {when}, {k['open_at_end']} still open when the drill stopped them")
    return f"{r['system']}: " + "; ".join(parts)


def drill_notes(rows: list[Figures]) -> list[str]:
    """What each drill saw beyond the counts (the prompt of death's answer, Envoy's outage, ...)."""
    out = []
    for s in CHAOS_ORDER:
        m, b = _row(rows, s, "mesh"), _row(rows, s, "baseline")
        both = [r for r in (m, b) if r]
        if not both:
            continue
        if s == "prompt-of-death":
            for r in both:
                p = r.get("poison") or {}
                err = " ".join(str(p.get("error", "")).split())[:160]
                out.append(
                    f"- `prompt-of-death` / {r['system']}: the poisoned request got HTTP {p.get('status')} "
                    f"after {p.get('seconds')} s ({err!r}); engines it took: {p.get('engines_taken')}; "
                    f"requests of other clients lost with them: {_lost(r)}."
                )
        elif s == "envoy-kill" and m:
            refused = m["failed"] + m["truncated"] - _lost(m)
            out.append(
                f"- `envoy-kill` / mesh: requests in flight at the kill lost: {_lost(m)}; requests refused while "
                f"no Envoy listened: {refused}; serving again after {_recover(m)} s "
                f"(goal ≤ {SERVE_AGAIN_GOAL_S:g} s)."
            )
        elif s == "relay-kill" and m:
            out.append(
                f"- `relay-kill` / mesh: requests in flight at the kill lost: {_lost(m)}; every relay "
                f"process answering again after {_recover(m)} s."
            )
        elif s == "crash-loop" and m:
            for ev in m["events"]:
                n = _notes(ev)
                out.append(
                    f"- `crash-loop` / mesh: {n.get('failed_starts')} failed starts during the fault; the agent "
                    f"reported the crash loop: {'yes' if n.get('crash_loop_reported') else 'no'} (verdict causes "
                    f"seen: {', '.join(n.get('causes', []))}); routed again {_recover(m)} s after starts could "
                    "succeed (the next retry at the capped backoff, then start-up and the first canary)."
                )
        elif s == "engine-agent-kill" and m:
            for ev in m["events"]:
                n = _notes(ev)
                outlived = n.get("engine_outlived_agent")
                why = "when its TTL check expired" if outlived else "Envoy stopped routing to the dead engine"
                out.append(
                    f"- `engine-agent-kill` / mesh: the engine {'outlived' if outlived else 'died with'} its "
                    f"killed agent; out of rotation after {report.detect_cell(m)} s ({why}); "
                    f"routed again {_recover(m)} s after the agent was started again"
                    + (
                        f" (at the end: agent says {n.get('agent_view')}, the port's listener is pid "
                        f"{n.get('listening_pid')}, the old engine "
                        f"{'still runs' if n.get('old_engine_alive_at_the_end') else 'is gone'})"
                        if m["recover_s"] is None
                        else ""
                    )
                    + "."
                )
        elif s == "slowloris":
            for r in both:
                out.append(f"- `slowloris` / {_slowloris(r)}.")
        elif s in ("consul-leader-loss", "consul-leader-cut") and m:
            out.append(_leader_loss_note(m))
        elif s == "gateway-host-loss" and m:
            out.append(_gateway_loss_note(m))
    return out


def _leader_loss_note(m: Figures) -> str:
    ll = m.get("leader_loss") or {}
    left = ", ".join(ll.get("left_the_catalog") or []) or "none"
    samples = ll.get("gateway_samples", 0)
    routed = samples - ll.get("gateway_samples_not_routing_every_engine", 0)
    how = "cut off the network" if ll.get("how") == "cut" else "killed -9"
    change = ll.get("change_reached_envoy_s")
    return (
        f"- `{m['scenario']}` / mesh: leader {ll.get('cut') or ll.get('killed')} {how}; {ll.get('new_leader')} "
        f"elected after {ll.get('new_leader_s')} s (Consul's default Raft timing, as the Ansible role leaves it); "
        f"instances that left the catalog (read from a follower): {left}, fewest passing "
        f"{ll.get('fewest_passing_in_catalog')} of {m['engines']}; the gateway's catalog reads failed "
        f"{ll.get('gateway_watch_errors')} time(s) meanwhile (it keeps its last snapshot), and its Envoy routed "
        f"to every engine in {routed} of {samples} samples (every 0.1 s) until the fault's end; a catalog change "
        f"made once the new leader was there (a draining instance registered through a live server) reached "
        f"the gateway's Envoy after {'never' if change is None else f'{change:g} s'}."
        + (LEADER_CUT_LIMIT if ll.get("how") == "cut" else "")
    )


# Why consul-leader-cut's change may take a moment more than consul-leader-loss's.
LEADER_CUT_LIMIT = (
    " Which server answers the gateway is its local Consul agent's choice: a follower answers at once "
    "(the watch's reads are stale); a blocking query the agent had sent to the leader that was cut off "
    "would wait until the agent's connection to it times out (yamux keepalive, about 25 s after the cut) "
    "— the watch asks for the leader every 2 s while a query is parked and reads afresh once it changed."
)


def _gateway_loss_note(m: Figures) -> str:
    g = m.get("gateway_loss") or {}
    fl, ac = g.get("in_flight_on_lost") or {}, g.get("after_cut") or {}
    return (
        f"- `gateway-host-loss` / mesh: {g.get('clients_on_lost_at_cut')} of {g.get('clients')} clients were on "
        f"the lost gateway at the cut"
        + (
            " (with both addresses in the answer, every client connected to the same one: glibc's getaddrinfo "
            "orders the addresses by RFC 6724's rules, the longest matching prefix among them, so clients on "
            "one subnet all try the same gateway first — one name spreads clients across subnets, not within one)"
            if g.get("clients") and g.get("clients_on_lost_at_cut") == g.get("clients")
            else ""
        )
        + f". In flight on it: {fl.get('requests')} requests ({fl.get('streams')} "
        f"streaming) — {fl.get('truncated')} truncated, {fl.get('failed')} failed (a stream that has started "
        f"cannot be retried by any client), {fl.get('ok')} completed after the SDK's retry on the other gateway. "
        f"Started after the cut: {ac.get('requests')}, {ac.get('failed')} failed, {ac.get('truncated')} "
        f"truncated. Not ok on the surviving gateway: {g.get('not_ok_on_survivor_only')}; not ok otherwise: "
        f"{g.get('other_not_ok')}. Consul's DNS stopped naming the lost gateway {report.detect_cell(m)} s after "
        f"the cut; every client had been served by the other {_recover(m)} s after it."
    )


def _settings(rows: list[Figures]) -> str:
    r = rows[0]
    return (
        f"{r['engines']} {'simulated' if r['engine'] == 'sim' else 'vLLM (CPU build)'} engines per system, "
        f"{r['concurrency']} concurrent clients, {r['stream_ratio']:.0%} streaming, "
        f"about {min(x['duration_s'] for x in rows):.0f}–{max(x['duration_s'] for x in rows):.0f} s of load per "
        "run (a run lasts until every fault was recovered from, or 60 s after the scenario ended)."
    )


# --- findings ---------------------------------------------------------------------------------


def _why(r: Figures) -> str:
    s = r["scenario"]
    if s == "relay-kill":
        return (
            "A relay process holds the connections of the requests it relays (Envoy's edge → relay): when "
            "it dies they end, and Envoy retries only what had not started answering (on the other relay). "
            "A stream it was relaying is cut at the client — agent/gateway/relays.py says so; keeping them "
            "would need the client's connection to outlive the relay process."
        )
    if s == "envoy-kill":
        return (
            "Every client connection ends at the Envoy that dies: the requests in flight are lost and new "
            "ones are refused until another Envoy listens. The seconds until then are the gateway agent's: "
            "it sees the death at its next reconcile tick (`reconcile_interval_s`, 1 s), starts the next "
            "Envoy after `envoy_restart_backoff_initial_s` (acted on at a reconcile tick), and the new Envoy "
            "starts and gets its first xDS push (the gateway agent's log in the drill's workdir has the "
            "times)."
        )
    if s == "engine-agent-kill" and r["recover_s"] is None:
        return (
            "The killed agent's engine runs in its own session, so it lived on and kept its port; the "
            "restarted agent's own engine could not bind it (the simulated engine exits with code 3), so "
            "the agent crash-looped and the instance stayed out of rotation for the rest of the drill, "
            "while each retry briefly let the agent's probes reach the left-over engine. No request was "
            "lost (the left-over engine served until its TTL expired), but the engine's capacity was. An "
            "engine that dies with its agent (PR_SET_PDEATHSIG), or an agent that takes over or stops "
            "what its predecessor left, would not be left behind."
        )
    return "What happened to each request is in the errors below the detailed table; docs/gateway.md, Known limits."


def shortfalls(results: Figures) -> list[str]:
    rows = (results.get("drills") or {}).get("rows", [])
    vrows = (results.get("vllm") or {}).get("rows", [])
    out = []
    m = _row(rows, "kill", "mesh")
    vm = _row(vrows, "kill", "mesh")
    if (m and m["truncated"]) or (vm and vm["truncated"]):
        counts = "; ".join(
            f"{r['truncated']} of {r['requests']} requests with {kind} engines"
            for r, kind in ((m, "simulated"), (vm, "vLLM"))
            if r
        )
        out.append(SHORTFALL_KILL.format(counts=counts))
    others = [
        r
        for r in rows + vrows
        if r["system"] == "mesh"
        and (not goal_met(r) or (r["scenario"] == "engine-agent-kill" and r["recover_s"] is None))
        and not (r["scenario"] == "kill" and not r["failed"])
    ]
    for r in others:
        errs = "; ".join(f"{n} × {e}" for e, n in r["errors"].items()) or "none"
        missed = "" if goal_met(r) else f"{r['failed']} failed, {r['truncated']} truncated"
        if r["scenario"] == "envoy-kill":
            missed = f"serving again after {_recover(r)} s (goal ≤ {SERVE_AGAIN_GOAL_S:g} s)"
        if r["scenario"] == "engine-agent-kill" and r["recover_s"] is None:
            missed = ", ".join(x for x in (missed, "the engine never routed again") if x)
        out.append(f"### {r['scenario']} ({r['engine']}): {missed}\n\nErrors: {errs}. {_why(r)}\n")
    if not out:
        return []
    return ["## Where ernie-mesh falls short, and why", "", *out]


NOT_YET = """## Not measured yet

- `site.yml` re-run after a code change under load: no drill yet.
"""
SOAK_RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"


def soak_section() -> list[str]:
    """bench/results/soak.json (`python -m bench.soak`, a separate 30-minute run) as a table."""
    try:
        r = json.loads(SOAK_RESULTS.read_text())
    except (OSError, ValueError):
        return ["## Soak", "", "Not run yet (`python -m bench.soak`, 30 min).", ""]
    load = r["load"]
    out = [
        f"## Soak — {r['minutes']:.0f} min under steady load (simulated engines)",
        "",
        f"`python -m bench.soak`: {load['requests']:,} requests, {load['failed']} failed, "
        f"{load['truncated']} truncated; RSS sampled every {r['sample_s']:.0f} s, growth from the end of a "
        f"{r['warmup_minutes']:.0f}-min warm-up to the end (medians of three samples each; goal ≤ "
        f"{r['growth_goal'] * 100:.0f} %). Consul writes (its raft index): "
        f"{r['consul_writes_per_min']:.1f} per minute.",
        "",
        "| process | RSS after warm-up MiB | at the end MiB | max MiB | growth |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, m in r["processes"].items():
        out.append(
            f"| {name} | {m['rss_start_mib']:.1f} | {m['rss_end_mib']:.1f} | {m['rss_max_mib']:.1f} | "
            f"{m['growth'] * 100:+.1f} % |"
        )
    return [*out, ""]


def reliability_doc(results: Figures) -> str:
    out = [RELIABILITY_HEAD]
    if results.get("drills"):
        rows = results["drills"]["rows"]
        out += _section(
            "## The chaos matrix — simulated engines",
            results["drills"],
            [
                _settings(rows) + " Each cell: ernie-mesh / baseline (— : the baseline has no such part).",
                "",
                *chaos_table(rows),
                "",
                "What the drills saw beyond the counts:",
                "",
                *(drill_notes(rows) or ["- nothing"]),
            ],
        )
        out += [
            "## Every figure — simulated engines",
            "",
            *_drill_body(rows),
            "",
        ]
    if results.get("vllm"):
        out += _section(
            "## Failure drills — real vLLM engines (CPU build)",
            results["vllm"],
            _drill_body(
                results["vllm"]["rows"],
                " The embedded default model (SmolLM2-135M-Instruct, `agent.model.prepare_default_model()`), CPU "
                "flags of `agent/local/defaults.py`. Two engines per system because two vLLM CPU engines already "
                "share the machine's two cores.",
            ),
        )
    out += shortfalls(results)
    out += soak_section()
    out += [NOT_YET]
    return "\n".join(out).rstrip() + "\n"


OVERHEAD_NOTE = (
    "How to read it. The client is one asyncio process with keep-alive connections; on two shared cores "
    "the client, the proxy and the engines compete for the same CPU (and other people's tests ran at the "
    "same time), so a proxy's cost shows up as lost throughput and in p99 more than in the median. The "
    "proxy's CPU per request is the figure that depends least on the rest of the machine; even so, "
    "differences under about 0.1 ms between two variants are within what two rounds of the same Envoy "
    "differ by here. **stock envoy** is the reference for Envoy itself: where it is far above nginx, "
    "no part of our policy is what costs — Envoy's HTTP path does (a profile of it under this load is "
    "flat: no hot spot; about a third of its time is the kernel's, a tenth context switches). "
    "Worker threads: Envoy runs one per core (2 here); **bare 1 worker** prices one. "
    "**The relay** (two Python processes, aiohttp on uvloop) costs several times Envoy per request: "
    "almost all of it per *request*, not per event (its CPU per non-streaming request is about what a "
    "stream costs), and a profile (py-spy) puts it in aiohttp's HTTP handling on both sides and the "
    "event loop's socket I/O; its own per-event work (find the event, cut the token-ID field, look for "
    "a finish reason) measures a few µs in isolation. The rate-limit check (a key with "
    "requests/tokens per minute, `agent/gateway/relay/limits.py`) reads and rewrites the shared usage "
    "file under an exclusive lock when a request is admitted and again when it ends (tokens): that is "
    "its price in the table. Envoy's policy as shipped (what every setting is for): "
    "[gateway.md](gateway.md#envoy-policy-envoybootstrapyaml-knobs-in-policy)."
)


def benchmarks_doc(results: Figures) -> str:
    out = [BENCHMARKS_HEAD]
    if results.get("overhead"):
        o = results["overhead"]
        out += _section(
            "## Proxy overhead",
            o,
            [
                report.overhead_settings(o),
                "",
                *report.overhead_table(o),
                "",
                "Against the goals of issue 17 (the bare hop at or below nginx's CPU per request, or within 1.2× "
                "with the rest attributed to a policy we keep; throughput vs direct at or above nginx's):",
                "",
                *report.overhead_findings(o),
                "",
                "### What each part of the policy costs",
                "",
                "Each variant is an Envoy of its own, rendered by the benchmark from the gateway's bootstrap "
                "(`agent/gateway/bootstrap.py`, relay and API keys off: the bare hop) with one part changed, "
                "running beside the others and fed by the same gateway agent's ADS server; the same load, in "
                "the same rounds. *vs bare* is the median over rounds of the variant's Envoy CPU per request "
                "minus the bare hop's in the same round: for a variant that takes a part out (-), a negative "
                "difference is what that part costs; for one that adds a part (+), a positive one. Differences "
                "under about 0.1 ms are within the noise of this machine.",
                "",
                *report.overhead_variants_table(o),
                "",
                "### The relay path",
                "",
                *report.overhead_relay_table(o),
            ],
            OVERHEAD_NOTE,
        )
    if results.get("propagation"):
        out += _section(
            "## Propagation: Consul health change → Envoy",
            results["propagation"],
            report.propagation_lines(results["propagation"]),
            "The baseline's equivalent is its polling period: a health change reaches nginx 0–10 s later "
            "(5 s on average, plus up to 5 s of /health timeout for an engine that stopped answering), "
            "and a hung engine that still answers /health never does.",
        )
    if results.get("routing"):
        from bench.routing import ROUTING_NOTE, markdown

        out += _section("## Routing", results["routing"], [markdown(results["routing"])], ROUTING_NOTE)
    if results.get("routing_vllm"):
        from bench.routing import ROUTING_VLLM_NOTE, markdown

        out += _section(
            "## Routing with real vLLM", results["routing_vllm"], [markdown(results["routing_vllm"])], ROUTING_VLLM_NOTE
        )
    if results.get("scale"):
        out += _scale_section(results["scale"])
    return "\n".join(out).rstrip() + "\n"


SCALE_NOTE = (
    "*old* is the gateway as it was at commit {baseline} (before issue 14's scale work), run from a "
    "`git archive` of that commit (its own processes, PYTHONPATH at that tree); *new* is this checkout. "
    "Both run in the same run against the same Consul dev agent holding the same N instances (registered "
    "through the catalog API on N/8 nodes, as the engine agents of N/8 hosts would; verdict flips are "
    "catalog writes of one instance's check, the write a host's Consul agent makes when its TTL check "
    "changes). *Consul's answer*: the gateway's read (`GET /v1/health/service/ernie?stale`) timed to "
    "the last byte, not decoded — what any reader of Consul 1.8 pays per wake-up, since the endpoint "
    "returns the whole service. *read*, *snapshot build*, *EDS encode*: per flip, in a process of that "
    "implementation (`bench/scale_probe.py`), medians of 10. The rest: a real gateway agent and its "
    "Envoy; flips timed from the Consul write to Envoy's `membership_total` gauge (polled every 10 ms: "
    "that polling is in Envoy's CPU figure); "
    "process CPU of the gateway agent, Envoy and the Consul agent during the flips, minus their idle "
    "rate, per flip. *old* re-reads and re-parses the whole answer, re-reads it once more for its settle "
    "window, and rebuilds and re-encodes the whole snapshot on every change; *new* recognises an "
    "unchanged answer by its bytes, decodes only the instances whose bytes changed, keeps each "
    "unchanged instance's Endpoint and encoded EDS bytes, and settles only bursts."
)


def _scale_section(s: Figures) -> list[str]:
    sizes = dict(sorted(s.get("sizes", {}).items(), key=lambda kv: int(kv[0])))
    title = "## Scale: " + ", ".join(f"{int(n):,}" for n in sizes) + " registered instances, old and new gateway"
    body = [*report.scale_table(sizes)]
    if s.get("fanout"):
        body += [
            "",
            f"### Consul's side: {next(iter(x['watchers'] for x in s['fanout'].values() if isinstance(x, dict)), '?')} "
            "watchers of one service",
            "",
            *report.fanout_table(s["fanout"]),
            "",
            "Each watcher is its own process watching exactly as a gateway does (`bench/scale_watcher.py`: "
            "`CatalogWatch` over `ConsulCatalog`, the gateway's watch settings), from the tree of the code "
            "named, started one after another (each once it has its first answer); Consul CPU is the dev "
            "agent's (one server) per flip, minus its idle rate.",
        ]
    note = SCALE_NOTE.format(baseline=s.get("baseline", "?"))
    for n, m in (s.get("rows_machine") or {}).items():  # rows run on their own (python -m bench.scale --sizes N)
        note += f" The {int(n):,} rows ran on their own: {_machine(m)}."
    return _section(title, s, body, note)


def write(results: Figures) -> None:
    report.DOC.parent.mkdir(parents=True, exist_ok=True)
    report.DOC.write_text(benchmarks_doc(results))
    report.RELIABILITY_DOC.write_text(reliability_doc(results))
