"""docs/benchmarks.md from the figures in bench/results/latest.json (rewritten by `python -m bench`)."""

from __future__ import annotations

from bench import report
from bench.report import Figures


def _machine(m: Figures) -> str:
    load = ", ".join(f"{x:.1f}" for x in m.get("loadavg", ()))
    return (
        f"{m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}; "
        f"commit {m['commit']}; {m['date']}; load average at the end of the part: {load}"
    )


def _row(rows: list[Figures], scenario: str, system: str) -> Figures | None:
    return next((r for r in rows if r["scenario"] == scenario and r["system"] == system), None)


HEAD = """# Benchmarks: ernie-mesh against the naive nginx design

*Written by `python -m bench` from `bench/results/latest.json`; do not edit by hand.* Every figure
comes from one run on a shared 2-core machine where other work was running at the same time: read
the counts (failed, truncated) as exact and the times as medians of a noisy machine; the ratios
matter more than the absolute milliseconds.

Reproduce: `python -m bench` (drills with simulated engines for both systems, proxy overhead,
propagation, scale; about 40 minutes), `python -m bench --only vllm` (kill, hang and rolling with real
vLLM engines), or a single drill: `ernie-mesh drill kill --system both --duration 60 --json`.

## What is compared

- **ernie-mesh**: a Consul dev agent; one engine agent per engine (`ernie-mesh engine`, default
  policy: probe every 1 s, a 1-token canary every 1 s with a 3 s deadline; a vLLM engine whose
  model processes are stopped, or do not compute for 2 s while work is in flight, is hung —
  facts from /proc; without them (simulated engines) a stall watchdog of 8 s; TTL 10 s; drains
  before stopping); one gateway agent (`ernie-mesh gateway`) with its Envoy (policy in
  `envoy/bootstrap.yaml`, see docs/gateway.md: least-request, retries of connect-failure / 503 on
  other hosts, outlier ejection on local-origin failures, no route timeout) and its **resuming
  relay** (2 processes: a stream whose engine dies, hangs or aborts continues on another instance
  from the relayed token IDs).
- **baseline** (`bench/baseline/`): Debian's nginx with a round-robin `upstream` over the engine
  ports, `proxy_read_timeout 300s`, and `healthcheck.py`, which polls every engine's `/health`
  every 10 s (5 s timeout), rewrites the upstream list to the engines that answered 200 and runs
  `nginx -s reload`. Faithful but fair: it has what a careful naive setup for an LLM API has —
  `proxy_buffering off` (without it SSE tokens arrive in bursts; many naive setups forget it, which
  would only make the baseline look worse), HTTP/1.1 keep-alive to the engines, `worker_processes
  auto` (Envoy also runs one worker per core) — and nothing it would not have: no retries of
  POSTs (nginx's default `proxy_next_upstream error timeout` moves a request to the next server
  only when the connection could not be made), no active health checks, no ejection beyond nginx's
  passive `max_fails=1 fail_timeout=10s`. Engines are restarted the plain way (`systemctl
  restart`: SIGTERM, with vLLM's default `--shutdown-timeout 0`, which aborts requests in flight).
- **Same engines, same load**: each system gets its own fresh set of engines (same count, same
  settings), one system after the other. Load: the official `openai` client (`max_retries=0`: we
  measure the serving system, not the client's retry loop), N closed-loop clients, half of the
  requests streaming, `ignore_eos` with `max_tokens` 32 so a short answer is detectable, client
  timeout 60 s (300 s with vLLM).

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
  `healthcheck.py` reloaded nginx without it. *never*: it stayed in rotation for the whole fault.
  For rolling, the slowest of the engines.
- **recover s**: from the fault's end (engine started again, unfrozen, control plane back) to
  full recovery: the engine is in rotation again and has completed a request (control plane:
  every engine routable and Consul plus the gateway agent answering). For rolling, the slowest.
- *baseline ÷ mesh*: the ratio of the two rows (∞: the mesh had none).

Scenarios (fault at 25 % of the run, held for 35 % of it; rolling starts at 15 %):
`kill` — kill -9 of one of the engines (and its children); it is started again when the fault ends
(baseline: by hand; mesh: by its engine agent, whose restart backoff is set to the same delay).
`hang` — one engine frozen while `/health` still answers 200 (simulated engine fault `hang`;
with vLLM, SIGSTOP of its `VLLM::EngineCore` process), unfrozen at the fault's end.
`slow` — one engine 10× slower per token. `rolling` — every engine restarted one after another
(mesh: `POST <agent>/drain/<id>`, wait for "drained", restart its agent, wait until Envoy routes
to it again; baseline: plain restart, then wait for `/health` 200 before the next).
`consul-restart` — Consul stopped, started again empty (a dev agent). `gateway-restart` — the
gateway agent killed -9 (its Envoy keeps running), started again. The last two are mesh only.
"""


SHORTFALL_KILL = """### kill -9 truncated streams

Truncated answers in the `kill` drill: {counts}. Streams in flight on a killed engine are resumed
on another instance by the gateway's relay (docs/gateway.md, "Resuming relay"), so this should be
zero; the errors below say what happened to each. (Before the relay, every stream that had
started on the killed engine was cut: Envoy cannot retry a response that has started.)
"""


def _section(title: str, part: Figures, body: list[str], note: str = "") -> list[str]:
    """One part of the document: title, the machine it ran on, its table, what to read in it."""
    return [title, "", f"Machine: {_machine(part['machine'])}.", "", *body, "", *([note, ""] if note else [])]


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


def write(results: Figures) -> None:
    out = [HEAD]
    if results.get("drills"):
        out += _section(
            "## Failure drills — simulated engines", results["drills"], _drill_body(results["drills"]["rows"])
        )
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
    if results.get("overhead"):
        out += _section(
            "## Proxy overhead",
            results["overhead"],
            report.overhead_table(results["overhead"]),
            'The client is one asyncio process with keep-alive connections; "direct" spreads requests '
            "round-robin over the three engines itself. On two shared cores the client, the proxy and the "
            "engines compete for the same CPU, so the proxy's cost shows up as lost throughput (and in "
            "p99) rather than added median latency: with a proxy in the path the closed-loop clients "
            "send fewer requests per second, the engines' queues are shorter, and a median can come out "
            '*below* direct (a negative "added p50"). Read the throughput ratio and the proxy CPU per '
            "request as the cost. **envoy+relay** is the gateway as users run it: the generation routes "
            "go through the resuming relay (two Python processes, aiohttp on uvloop). Where its time "
            "goes: almost all of it per *request*, not per event — its CPU per non-streaming request "
            "(one event to the client, the same stream upstream) is about what a streaming one costs, "
            "and a profile (py-spy) puts it in aiohttp's HTTP handling on both sides (parsing the "
            "request, preparing the response, the client request through Envoy's engine hop) and the "
            "event loop's socket I/O; the relay's own per-event work (find the event, cut the token-ID "
            "field, look for a finish reason) measures a few µs in isolation. So the relay misses the "
            "goals it was given (≥ 0.9× Envoy alone for streaming, ≤ 20 µs per event): on two cores "
            "more relay processes cannot add CPU (both cores are already busy with client, Envoy and "
            "engines in this benchmark); what would is a leaner HTTP layer than aiohttp for the two hops.",
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
    if results.get("scale"):
        out += _section(
            "## Scale: 500 and 2,000 registered instances",
            results["scale"],
            report.scale_table(results["scale"]["sizes"]),
            "Snapshot build and EDS encode: the gateway's own modules in-process (`build_snapshot`, "
            "`eds.cluster_load_assignment` + serialization), medians of 20 repeats. The other columns "
            "come from a real Consul dev agent holding N passing instances, a real gateway agent and its "
            "Envoy: time from the gateway agent's start to Envoy holding all N endpoints; single-instance "
            "verdict flips timed from the Consul write to Envoy's `membership_total` gauge; process CPU "
            "time of the gateway agent and of Envoy during the flips, minus their idle rate, per flip. "
            "Every change makes the agent re-read and re-parse the whole service from Consul and rebuild "
            "the whole snapshot (state of the world), which is what grows with N.",
        )
    report.DOC.parent.mkdir(parents=True, exist_ok=True)
    report.DOC.write_text("\n".join(out).rstrip() + "\n")


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
        if r["system"] == "mesh" and (r["failed"] or (r["truncated"] and r["scenario"] != "kill"))
    ]
    for r in others:
        errs = "; ".join(f"{n} × {e}" for e, n in r["errors"].items())
        out.append(
            f"### {r['scenario']} ({r['engine']}): {r['failed']} failed, {r['truncated']} truncated\n\n"
            f"Errors: {errs}. What happened and what is left: docs/gateway.md, Known limits.\n"
        )
    if not out:
        return []
    return ["## Where ernie-mesh falls short, and why", "", *out]
