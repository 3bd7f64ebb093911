"""`ernie-mesh drill <scenario>`: a failure drill under steady load, for ernie-mesh and/or the naive
nginx baseline, each on its own fresh set of engines (same count, same settings, same load).

    ernie-mesh drill kill --system both --engines 3 --duration 60 --concurrency 8
    ernie-mesh drill all --json

Progress goes to stderr; the result (a table, or one JSON object per system with --json) to
stdout. Ctrl-C stops the load, the engines and every process the drill started.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import scenarios as sc
from bench.engines import EngineSettings
from bench.load import LoadConfig, LoadGenerator, summarize
from bench.monitor import Monitor
from bench.system import System

PROGRESS_EVERY_S = 5.0
RECOVERY_WAIT_SIM_S = 60.0
RECOVERY_WAIT_VLLM_S = 300.0
TAIL_S = 3.0  # load keeps running this long after the scenario finished
MAX_NOT_OK = 200


@dataclass(frozen=True)
class DrillOptions:
    scenario: str
    system: str = "both"  # mesh | baseline | both
    engines: int = 3
    engine: str = "sim"  # sim | vllm
    duration_s: float = 60.0
    concurrency: int = 8
    stream_ratio: float = 0.5
    max_tokens: int = 32
    token_delay_ms: float = 20.0
    request_timeout_s: float = 60.0
    hold_s: float | None = None  # fault length; default scenarios.NOMINAL_HOLD_S, else HOLD x duration
    health_interval_s: float = 10.0  # the baseline's health-check period
    # engine agent settings for this drill (e.g. a shorter restart backoff in CI's crash-loop drill)
    agent_settings: dict[str, Any] = field(default_factory=dict)
    slow_connections: int = sc.SLOWLORIS_CONNECTIONS
    # how long after a fault's end the drill waits for recovery (default 60 s, 300 s with vLLM)
    recover_wait_s: float | None = None

    @property
    def hold(self) -> float:
        if self.hold_s is not None:
            return self.hold_s
        return sc.NOMINAL_HOLD_S.get(self.scenario, round(sc.HOLD * self.duration_s, 1))

    def systems(self) -> list[str]:
        names = ["mesh", "baseline"] if self.system == "both" else [self.system]
        if self.scenario in sc.MESH_ONLY:
            names = [n for n in names if n == "mesh"]
        return names


def progress(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} drill: {msg}", file=sys.stderr, flush=True)


def build_system(name: str, opts: DrillOptions, settings: EngineSettings, workdir: Path) -> System:
    if name == "mesh" and opts.scenario in sc.NETNS:
        from bench.netns_mesh import NetnsMeshSystem

        host_loss = opts.scenario == "gateway-host-loss"
        return NetnsMeshSystem(
            settings,
            opts.engines,
            workdir / "mesh-netns",
            progress,
            servers=1 if host_loss else 3,
            gateways=2 if host_loss else 1,
            dns_clients=host_loss,
            agent_settings=opts.agent_settings,
        )
    if name == "mesh":
        from bench.mesh import MeshSystem

        agent_settings: dict[str, Any] = {}
        if opts.scenario == "kill":
            # "restart it later": the agent restarts the engine itself, at the fault's end like the baseline
            agent_settings = {"restart_backoff_initial_s": opts.hold, "restart_backoff_max_s": max(30.0, opts.hold)}
        agent_settings.update(opts.agent_settings)
        return MeshSystem(settings, opts.engines, workdir / "mesh", progress, agent_settings)
    from bench.baseline.system import BaselineSystem

    return BaselineSystem(settings, opts.engines, workdir / "baseline", progress, opts.health_interval_s)


def engine_settings(opts: DrillOptions) -> EngineSettings:
    from bench.engines import sim_settings, vllm_settings

    if opts.engine == "vllm":
        return vllm_settings(progress=lambda m: progress(f"model: {m}"))
    return sim_settings(opts.token_delay_ms)


def run_one(
    name: str, opts: DrillOptions, settings: EngineSettings, workdir: Path, stop: threading.Event
) -> dict[str, Any]:
    """Start a fresh system, run the scenario under load, stop everything; the figures."""
    system = build_system(name, opts, settings, workdir)
    ready_timeout = settings.start_timeout_s + 60
    monitor = load = scen = None
    failure: list[BaseException] = []
    try:
        system.start()
        system.wait_all_in_rotation(ready_timeout)
        monitor = Monitor(system).start()
        load = system.load_generator(
            LoadConfig(
                system.base_url,
                settings.served_model_name,
                opts.concurrency,
                opts.stream_ratio,
                opts.max_tokens,
                opts.request_timeout_s,
            )
        ).start()
        started_at = load.started_at
        if started_at is None:  # start() sets it
            raise RuntimeError("the load generator did not start")
        cap = opts.recover_wait_s or (RECOVERY_WAIT_VLLM_S if settings.kind == "vllm" else RECOVERY_WAIT_SIM_S)
        tl = sc.Timeline(
            system,
            monitor,
            started_at,
            opts.duration_s,
            opts.hold,
            stop,
            progress,
            ready_timeout,
            model=settings.served_model_name,
            workdir=system.workdir,
            slow_connections=opts.slow_connections,
            recover_wait_s=cap,
        )

        def scenario_thread() -> None:
            try:
                sc.SCENARIOS[opts.scenario](tl)
            except sc.Aborted:
                pass
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                failure.append(e)

        scen = threading.Thread(target=scenario_thread, daemon=True, name="scenario")
        scen.start()
        progress(
            f"[{name}] {opts.scenario}: load started ({opts.concurrency} clients, "
            f"{opts.stream_ratio:.0%} streaming, {opts.max_tokens} tokens) for {opts.duration_s:g}s"
        )
        last = 0.0
        scen_done_at = None
        # The load runs for the duration, until the scenario is done, and on until every fault has been
        # recovered from (the "serving again" check needs traffic), at most `cap` s after the last fault
        # ended (a scenario that watches for recovery itself may have spent that already).
        while not stop.is_set() and not failure:
            now = time.time()
            if not scen.is_alive() and scen_done_at is None:
                scen_done_at = now
            if (
                now - started_at >= opts.duration_s
                and scen_done_at is not None
                and (monitor.all_recovered() or now - max(monitor.fault_ends(), default=scen_done_at) > cap)
            ):
                break
            if now - last >= PROGRESS_EVERY_S:
                last = now
                s = summarize(load.snapshot(), 1)
                progress(
                    f"[{name} +{last - started_at:5.1f}s] requests {s.requests}, failed {s.failed}, "
                    f"truncated {s.truncated}, in rotation {sorted(monitor.rotation)}"
                )
            time.sleep(0.2)
        if not failure and not stop.is_set():
            stop.wait(TAIL_S)
        load.stop()
        elapsed = (load.stopped_at or time.time()) - started_at
        if failure:
            raise RuntimeError(f"{name}: scenario {opts.scenario} failed: {failure[0]}") from failure[0]
        monitor.stop()
        result = result_of(name, opts, load, monitor, elapsed) | tl.extra
        for finish in tl.finish:  # a scenario's figures from every request's outcome
            result |= finish(load.snapshot())
        return result
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        if load is not None:
            load.stop(wait_s=0 if stop.is_set() else 5)
        if monitor is not None:
            monitor.stop()
        stop_quietly(system)


def stop_quietly(system: System) -> None:
    """Stop every process of the system even if Ctrl-C is pressed again meanwhile."""
    old = (
        signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        progress(f"[{system.name}] stopping")
        system.stop()
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def result_of(name: str, opts: DrillOptions, load: LoadGenerator, monitor: Monitor, elapsed: float) -> dict[str, Any]:
    results = load.snapshot()
    t0 = load.started_at
    if t0 is None:
        raise ValueError("result_of: the load never started")
    s = summarize(results, elapsed)
    detects = [e.detect_s for e in monitor.events if e.index is not None]
    recovers = [e.recover_s for e in monitor.events]
    detected = [d for d in detects if d is not None]
    recovered = [r for r in recovers if r is not None]
    return {
        "scenario": opts.scenario,
        "system": name,
        "requests": s.requests,
        "failed": s.failed,
        "truncated": s.truncated,
        "p50_ms": s.p50_ms,
        "p99_ms": s.p99_ms,
        "ttft_p99_ms": s.ttft_p99_ms,
        # the slowest detection; None if an engine was never taken out of rotation (or no engine fault)
        "detect_s": max(detected) if detects and len(detected) == len(detects) else None,
        "recover_s": max(recovered) if recovers and len(recovered) == len(recovers) else None,
        "ttft_p50_ms": s.ttft_p50_ms,
        "ok_rps": s.rps,
        "stalled": s.stalled,
        "longest_wait_s": s.longest_wait_s,
        "engine": opts.engine,
        "engines": opts.engines,
        "concurrency": opts.concurrency,
        "stream_ratio": opts.stream_ratio,
        "duration_s": round(elapsed, 1),
        "hold_s": opts.hold if opts.scenario in sc.HELD else None,
        "errors": s.errors,
        "engine_fault": bool(detects),
        "events": [
            {
                "label": e.label,
                "index": e.index,
                "at_s": round(e.t_fault - t0, 2),
                "end_s": None if e.t_end is None else round(e.t_end - t0, 2),
                "detect_s": e.detect_s,
                "recover_s": e.recover_s,
                # requests under way when the fault struck that did not complete in full
                "lost_in_flight": sum(1 for r in results if r.outcome != "ok" and r.started <= e.t_fault < r.ended),
                **({"notes": e.notes} if e.notes else {}),
            }
            for e in monitor.events
        ],
        # every request that was not ok, times relative to the load start (what a test can reason about)
        "not_ok": [
            {
                "outcome": r.outcome,
                "stream": r.stream,
                "start_s": round(r.started - t0, 2),
                "end_s": round(r.ended - t0, 2),
                "tokens": r.tokens,
                "error": r.error,
            }
            for r in results
            if r.outcome != "ok"
        ][:MAX_NOT_OK],
    }


def run_drill(
    opts: DrillOptions, stop: threading.Event | None = None, workdir: Path | None = None
) -> list[dict[str, Any]]:
    stop = stop or threading.Event()
    if opts.engine == "vllm" and opts.scenario not in sc.VLLM_OK:
        raise SystemExit(f"ernie-mesh drill: scenario {opts.scenario} needs --engine sim")
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"ernie-drill-{opts.scenario}-"))
    progress(f"{opts.scenario}: {sc.DESCRIPTIONS[opts.scenario]}; logs in {workdir}")
    settings = engine_settings(opts)
    results = []
    for name in opts.systems():
        if stop.is_set():
            break
        results.append(run_one(name, opts, settings, workdir, stop))
    return results


# --- output -----------------------------------------------------------------------------------

JSON_KEYS = (
    "scenario",
    "system",
    "requests",
    "failed",
    "truncated",
    "p50_ms",
    "p99_ms",
    "ttft_p99_ms",
    "detect_s",
    "recover_s",
)


def fmt(v: object, unit: str = "") -> str:
    if v is None:
        return "never" if unit == "s" else "-"
    if isinstance(v, float):
        return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{v}{unit}"


def table(results: list[dict[str, Any]]) -> str:
    head = [
        "scenario",
        "system",
        "requests",
        "failed",
        "truncated",
        "p50 ms",
        "p99 ms",
        "TTFT p50",
        "TTFT p99",
        "detect",
        "recover",
    ]
    rows = [
        [
            r["scenario"],
            r["system"],
            fmt(r["requests"]),
            fmt(r["failed"]),
            fmt(r["truncated"]),
            fmt(r["p50_ms"]),
            fmt(r["p99_ms"]),
            fmt(r["ttft_p50_ms"]),
            fmt(r["ttft_p99_ms"]),
            fmt(r["detect_s"], "s") if r["engine_fault"] else "-",
            fmt(r["recover_s"], "s"),
        ]
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = [
        "  ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))
        for row in [head, *rows]
    ]
    notes = []
    for r in results:
        for err, n in list(r["errors"].items())[:4]:
            notes.append(f"  {r['system']}: {n} x {err}")
    return "\n".join(lines + (["", "not ok:"] + notes if notes else []))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh drill",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios:\n" + "\n".join(f"  {k:<16} {v}" for k, v in sc.DESCRIPTIONS.items()),
    )
    p.add_argument("scenario", choices=[*sc.SCENARIOS, "all"])
    p.add_argument("--system", choices=["mesh", "baseline", "both"], default="both")
    p.add_argument("--engines", type=int, default=3, help="engines per system (default 3)")
    p.add_argument(
        "--engine",
        choices=["sim", "vllm"],
        default="sim",
        help="simulated engines (default) or real vLLM (CPU build and the embedded default model)",
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--stream-ratio", type=float, default=0.5, help="fraction of streaming requests (default 0.5)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer, ignore_eos (default 32)")
    p.add_argument("--token-delay-ms", type=float, default=20.0, help="simulated engine: ms per token (default 20)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="client timeout, s (default 60)")
    p.add_argument("--hold", type=float, help="fault length, s (default 0.35 x duration)")
    p.add_argument("--json", action="store_true", help="one JSON object per system on stdout")
    return p


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM stops a run like Ctrl-C: engines, proxies and Consul are stopped on the way out."""
    signal.signal(signal.SIGTERM, _interrupt)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.engines < 1 or args.concurrency < 1 or not 0 <= args.stream_ratio <= 1 or args.duration <= 0:
        print(
            "ernie-mesh drill: --engines and --concurrency >= 1, --stream-ratio in [0, 1], --duration > 0",
            file=sys.stderr,
        )
        return 2
    names = list(sc.SCENARIOS) if args.scenario == "all" else [args.scenario]
    if args.engine == "vllm":
        names = [n for n in names if n in sc.VLLM_OK]
    stop = threading.Event()
    stop_on_sigterm()
    results: list[dict[str, Any]] = []
    try:
        for name in names:
            opts = DrillOptions(
                name,
                args.system,
                args.engines,
                args.engine,
                args.duration,
                args.concurrency,
                args.stream_ratio,
                args.max_tokens,
                args.token_delay_ms,
                args.request_timeout,
                args.hold,
            )
            for r in run_drill(opts, stop):
                results.append(r)
                if args.json:
                    print(
                        json.dumps({k: r[k] for k in JSON_KEYS} | {k: v for k, v in r.items() if k not in JSON_KEYS}),
                        flush=True,
                    )
    except KeyboardInterrupt:
        stop.set()
        progress("interrupted: everything stopped")
        return 130
    if not args.json:
        print(table(results))
    return 0
