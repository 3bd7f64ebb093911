"""Scale: the gateway with 500, 2,000 and 10,000 registered instances, the current implementation
side by side with the baseline's (the gateway before issue 14's scale work), in the same run.

    python -m bench.scale [--sizes 500 2000 10000] [--changes 10] [--impls old new]
                          [--watchers 20] [--fanout-size 2000] [--json]

"old" is commit BASELINE's tree, unpacked with `git archive` into the work directory and run as its
own processes (PYTHONPATH and working directory at that tree); "new" is this checkout. Both run
against the same Consul holding the same instances, one after the other.

Per size, a Consul dev agent holds N instances registered through the catalog API on N/8 nodes (as
the engine agents of N/8 hosts would make it; nothing listens on their addresses: Envoy has no
active health check). Verdict flips are catalog writes of the instance's check (passing <->
critical), the write an engine host's Consul agent makes when its TTL check changes. Per size:
  consul    Consul's own answer to the gateway's read (GET /v1/health/service/<s>?stale, the body
            read, not decoded): its time and size; the floor of any reader of Consul 1.8.
  probe     per implementation, in its own process (bench/scale_probe.py): per flip, the gateway's
            read of the service (Consul's answer + decoding), snapshot build, EDS encoding.
  live      per implementation, a real gateway agent (`ernie-mesh gateway`) and its Envoy: time to
            the first full snapshot in Envoy; `changes` single-instance flips, each timed from the
            Consul write to Envoy's membership gauge changing; gateway agent, Envoy and Consul CPU
            per change (process CPU during the flips minus their idle rate); the agent's push
            latency (its histogram: change seen -> Envoy's ACK).
Fan-out (at --fanout-size, per implementation): `watchers` processes each watching the service
exactly as a gateway does (bench/scale_watcher.py); per flip, the time from the Consul write until
every watcher has delivered it, and the Consul server's CPU per flip.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

from agent.local.consul_dev import ConsulDev
from agent.local.ports import free_ports
from agent.local.procs import ManagedProcess, mesh_command
from agent.local.wait import wait_until
from bench.keys import keys_file
from bench.load import percentile

BASELINE = "9800a09"  # the gateway before the incremental read/decode/build/encode path
SERVICE = "ernie"
CLUSTER = "ernie"
IDLE_WINDOW_S = 5.0
CHANGE_TIMEOUT_S = 60.0
FIRST_PORT = 20000
PER_NODE = 8
PROBE_REPEATS = 5
FANOUT_CHANGES = 6
FIRST_SNAPSHOT_TIMEOUT_S = 300.0
POLL_S = 0.01  # Envoy's membership gauge is polled this often (each poll costs Envoy CPU too)
ROOT = Path(__file__).resolve().parents[1]
META = {"model": "m", "served_model_name": "m", "zone": "z1", "engine": "vllm"}


def progress(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} scale: {msg}", file=sys.stderr, flush=True)


def baseline_tree(workdir: Path) -> Path:
    """The baseline's tree (`git archive BASELINE`), unpacked once into workdir."""
    tree = workdir / f"baseline-{BASELINE}"
    if not (tree / "agent").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def iid(i: int) -> str:
    return f"{SERVICE}-scale-{FIRST_PORT + i}"


def node_body(i: int) -> dict[str, Any]:
    return {"Node": f"scale-n{i // PER_NODE}", "Address": "127.0.0.1", "SkipNodeUpdate": True}


def register_body(i: int) -> dict[str, Any]:
    return {
        **node_body(i),
        "Service": {"ID": iid(i), "Service": SERVICE, "Address": "127.0.0.1", "Port": FIRST_PORT + i, "Meta": META},
        "Check": {
            "CheckID": f"service:{iid(i)}",
            "Name": f"ernie-mesh verdict for {iid(i)}",
            "Status": "passing",
            "Output": "passing",
            "ServiceID": iid(i),
        },
    }


def flip_body(i: int, critical: bool) -> dict[str, Any]:
    body = register_body(i)
    del body["Service"]
    body["Check"].update(
        Status="critical" if critical else "passing", Output="critical: bench" if critical else "passing"
    )
    return body


class Fleet:
    """A Consul dev agent holding n instances; flips one instance's check."""

    def __init__(self, n: int, workdir: Path):
        self.n = n
        (workdir / "consul").mkdir(parents=True, exist_ok=True)
        self.consul = ConsulDev(node="ernie-scale", data_dir=str(workdir / "consul")).start()
        self.http = httpx.Client(timeout=60)
        self.proc = psutil.Process(self.consul.proc.pid if self.consul.proc else 0)
        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: self._put(register_body(i)), range(n)))
        progress(f"{n} instances registered in {time.perf_counter() - t:.1f}s")
        self.critical: set[int] = set()

    def _put(self, body: dict[str, Any]) -> None:
        for attempt in range(5):
            try:
                self.http.put(f"{self.consul.url}/v1/catalog/register", json=body).raise_for_status()
                return
            except httpx.HTTPError:
                if attempt == 4:
                    raise
                time.sleep(0.5)

    def flip(self, i: int) -> int:
        """Flip instance i; returns how many instances are routable (not critical) after it."""
        critical = i not in self.critical
        self._put(flip_body(i, critical))
        (self.critical.add if critical else self.critical.discard)(i)
        return self.n - len(self.critical)

    def answer(self) -> dict[str, float]:
        """Consul's own answer to the gateway's read: time to the whole body, and its size."""
        url = f"{self.consul.url}/v1/health/service/{SERVICE}"
        times, size = [], 0
        for _ in range(PROBE_REPEATS):
            t = time.perf_counter()
            r = self.http.get(url, params={"stale": "1"})
            size = len(r.content)
            times.append(time.perf_counter() - t)
        return {"consul_answer_ms": statistics.median(times) * 1000, "consul_answer_kib": size / 1024}

    def stop(self) -> None:
        self.http.close()
        self.consul.stop()


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _stats(admin: str) -> dict[str, int]:
    text = httpx.get(f"{admin}/stats", params={"filter": f"^cluster\\.{CLUSTER}\\.membership_"}, timeout=5).text
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if v.strip().isdigit():
            out[k.rsplit(".", 1)[-1]] = int(v)
    return out


def _push_hist(metrics_url: str) -> tuple[float, float]:
    text = httpx.get(metrics_url, timeout=5).text
    s = c = 0.0
    for line in text.splitlines():
        if line.startswith("ernie_gateway_xds_push_latency_seconds_sum"):
            s = float(line.split()[-1])
        elif line.startswith("ernie_gateway_xds_push_latency_seconds_count"):
            c = float(line.split()[-1])
    return s, c


def _membership_is(admin: str, want: int) -> Callable[[], bool]:
    return lambda: _stats(admin).get("membership_total") == want


def _env(tree: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(tree)}


def probe(fleet: Fleet, tree: Path) -> dict[str, Any]:
    """The implementation's read, build and encode per flip, in its own process (scale_probe.py)."""
    picks = [(k * 7919) % fleet.n for k in range(PROBE_REPEATS)]
    flips = [flip_body(i, True) for i in picks] + [flip_body(i, False) for i in picks]
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "scale_probe.py"),
            "--consul",
            fleet.consul.address,
            "--service",
            SERVICE,
            "--flips",
            json.dumps(flips),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **_env(tree)},
        cwd=str(tree),
        check=False,
        timeout=1800,
    )
    if out.returncode != 0:
        last = [ln for ln in out.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
        raise RuntimeError(f"scale probe failed: {last[0].strip()}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def live(fleet: Fleet, tree: Path, changes: int, workdir: Path) -> dict[str, Any]:
    n = fleet.n
    listen, admin_port, xds, metrics_port = free_ports(4)
    admin = f"http://127.0.0.1:{admin_port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    t0 = time.perf_counter()
    gateway = ManagedProcess(
        "gateway",
        mesh_command(
            "gateway",
            "--name",
            "scale",
            "--consul",
            fleet.consul.address,
            "--service",
            SERVICE,
            "--listen",
            f"127.0.0.1:{listen}",
            "--envoy-admin",
            f"127.0.0.1:{admin_port}",
            "--xds",
            f"127.0.0.1:{xds}",
            "--metrics",
            f"127.0.0.1:{metrics_port}",
            "--run-dir",
            str(workdir / "gateway"),
            "--api-keys",
            keys_file(workdir),
        ),
        workdir / "gateway.log",
        env=_env(tree),
        cwd=str(tree),
    ).start()
    try:
        routable = n - len(fleet.critical)
        wait_until(
            _membership_is(admin, routable),
            FIRST_SNAPSHOT_TIMEOUT_S,
            interval_s=0.05,
            what=f"Envoy with {routable} endpoints",
        )
        first_s = time.perf_counter() - t0
        progress(f"{n}: first full snapshot in Envoy after {first_s:.2f}s (gateway agent start included)")
        agent_p = psutil.Process(gateway.pid)
        envoy_p = psutil.Process(json.loads((workdir / "gateway" / "envoy.json").read_text())["pid"])
        procs = (agent_p, envoy_p, fleet.proc)
        time.sleep(2.0)  # let start-up work settle
        c0, t_idle = [_cpu(p) for p in procs], time.perf_counter()
        time.sleep(IDLE_WINDOW_S)
        idle_s = time.perf_counter() - t_idle
        idle = [(_cpu(p) - c) / idle_s for p, c in zip(procs, c0)]
        push_sum0, push_count0 = _push_hist(metrics_url)
        c0, t_changes = [_cpu(p) for p in procs], time.perf_counter()
        durations = []
        for k in range(changes):
            t = time.perf_counter()
            want = fleet.flip((k // 2 * 7) % n)
            wait_until(_membership_is(admin, want), CHANGE_TIMEOUT_S, interval_s=POLL_S, what=f"change {k} in Envoy")
            durations.append(time.perf_counter() - t)
        span = time.perf_counter() - t_changes
        cpu = [max((_cpu(p) - c - r * span) / changes, 0.0) * 1000 for p, c, r in zip(procs, c0, idle)]
        push_sum, push_count = _push_hist(metrics_url)
        pushes = push_count - push_count0
        p50, p99 = percentile(durations, 50), percentile(durations, 99)
        if p50 is None or p99 is None:
            raise ValueError(f"scale: no change timed (changes={changes})")
        return {
            "first_snapshot_s": first_s,
            "change_p50_ms": p50 * 1000,
            "change_p99_ms": p99 * 1000,
            "agent_push_mean_ms": (push_sum - push_sum0) / pushes * 1000 if pushes else None,
            "agent_cpu_ms_per_change": cpu[0],
            "envoy_cpu_ms_per_change": cpu[1],
            "consul_cpu_ms_per_change": cpu[2],
            "agent_idle_cpu_pct": idle[0] * 100,
            "changes": changes,
        }
    finally:
        gateway.stop(30)


def fanout(fleet: Fleet, tree: Path, watchers: int, changes: int) -> dict[str, Any]:
    """`watchers` processes watching as the gateway does: time from a flip to the last one's delivery."""
    procs: list[subprocess.Popen[str]] = []
    lines: list[queue.Queue[dict[str, Any]]] = []
    for _ in range(watchers):
        p = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "scale_watcher.py"),
                "--consul",
                fleet.consul.address,
                "--service",
                SERVICE,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **_env(tree)},
            cwd=str(tree),
            start_new_session=True,
        )
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=lambda p=p, q=q: [q.put(json.loads(x)) for x in p.stdout or ()], daemon=True).start()
        procs.append(p)
        lines.append(q)
        # one after another, each once it has its first answer (gateways do not all start at once;
        # 20 first reads of the whole service at once is a start-up herd, not the fan-out measured)
        first = q.get(timeout=600)
        if first["routable"] != fleet.n - len(fleet.critical):
            raise TimeoutError(f"a watcher's first delivery had {first['routable']} routable instances")
    try:

        def wait_all(want: int, timeout_s: float) -> float:
            """Until every watcher delivered `want` routable instances; the last one's monotonic time."""
            deadline, last = time.monotonic() + timeout_s, 0.0
            for q in lines:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"a watcher did not deliver {want} routable instances in {timeout_s:.0f}s")
                    x = q.get(timeout=left)
                    if x["routable"] == want:
                        last = max(last, x["t"])
                        break
            return last

        ps = [psutil.Process(p.pid) for p in procs]
        time.sleep(2.0)
        c0, t_idle = _cpu(fleet.proc), time.perf_counter()
        w0 = sum(_cpu(p) for p in ps)
        time.sleep(IDLE_WINDOW_S)
        idle_s = time.perf_counter() - t_idle
        idle, widle = (_cpu(fleet.proc) - c0) / idle_s, (sum(_cpu(p) for p in ps) - w0) / idle_s
        c0, w0, t_changes = _cpu(fleet.proc), sum(_cpu(p) for p in ps), time.perf_counter()
        times = []
        for k in range(changes):
            t = time.monotonic()
            want = fleet.flip((k // 2 * 13 + 1) % fleet.n)
            times.append(wait_all(want, CHANGE_TIMEOUT_S * 4) - t)
        span = time.perf_counter() - t_changes
        consul_cpu = max((_cpu(fleet.proc) - c0 - idle * span) / changes, 0.0)
        watcher_cpu = max((sum(_cpu(p) for p in ps) - w0 - widle * span) / changes / watchers, 0.0)
        p50, p99 = percentile(times, 50), percentile(times, 99)
        return {
            "watchers": watchers,
            "fanout_p50_ms": (p50 or 0) * 1000,
            "fanout_p99_ms": (p99 or 0) * 1000,
            "consul_cpu_ms_per_change": consul_cpu * 1000,
            "watcher_cpu_ms_per_change": watcher_cpu * 1000,
            "changes": changes,
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def run(
    sizes: tuple[int, ...] = (500, 2000, 10000),
    changes: int = 10,
    workdir: Path | None = None,
    impls: tuple[str, ...] = ("old", "new"),
    watchers: int = 20,
    fanout_size: int = 2000,
) -> dict[str, Any]:
    """{"sizes": {"<n>": {"instances", "consul_answer_ms", "consul_answer_kib", "old": {...}, "new": {...}}},
    "fanout": {"instances", "old": {...}, "new": {...}}, "baseline": BASELINE}"""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ernie-bench-scale-"))
    trees = {"old": baseline_tree(workdir), "new": ROOT}
    out: dict[str, Any] = {"sizes": {}, "baseline": BASELINE}
    for n in sizes:
        fleet = Fleet(n, workdir / str(n))
        try:
            row: dict[str, Any] = {"instances": n, **fleet.answer()}
            progress(f"{n}: Consul answers in {row['consul_answer_ms']:.0f} ms ({row['consul_answer_kib']:.0f} KiB)")
            for impl in impls:
                try:
                    r = probe(fleet, trees[impl])
                    progress(
                        f"{n} {impl}: read {r['read_ms']:.1f} ms, build {r['build_ms']:.2f} ms, "
                        f"encode {r['encode_ms']:.2f} ms ({r['eds_bytes'] / 1024:.0f} KiB)"
                    )
                    r.update(live(fleet, trees[impl], changes, workdir / str(n) / impl))
                except (RuntimeError, ValueError, AssertionError, TimeoutError, OSError, httpx.HTTPError) as e:
                    progress(f"{n} {impl}: failed: {e}")
                    row[impl] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    continue
                progress(
                    f"{n} {impl}: change -> Envoy p50 {r['change_p50_ms']:.1f} ms p99 {r['change_p99_ms']:.1f} ms, "
                    f"agent CPU {r['agent_cpu_ms_per_change']:.1f} ms/change, Envoy "
                    f"{r['envoy_cpu_ms_per_change']:.1f}, Consul {r['consul_cpu_ms_per_change']:.1f}"
                )
                row[impl] = r
            if n == fanout_size and watchers:
                fan: dict[str, Any] = {"instances": n}
                for impl in impls:
                    try:
                        fan[impl] = fanout(fleet, trees[impl], watchers, FANOUT_CHANGES)
                    except (TimeoutError, queue.Empty, OSError) as e:
                        progress(f"fan-out {n} {impl}: failed: {e!r}")
                        fan[impl] = {"watchers": watchers, "error": f"{type(e).__name__}: {e}"[:300]}
                        continue
                    progress(
                        f"fan-out {n} {impl}: {watchers} watchers, p50 {fan[impl]['fanout_p50_ms']:.0f} ms "
                        f"p99 {fan[impl]['fanout_p99_ms']:.0f} ms, Consul CPU "
                        f"{fan[impl]['consul_cpu_ms_per_change']:.0f} ms/change"
                    )
                out["fanout"] = fan
        finally:
            fleet.stop()
        out["sizes"][str(n)] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 10000])
    p.add_argument("--changes", type=int, default=10)
    p.add_argument("--impls", nargs="+", choices=("old", "new"), default=["old", "new"])
    p.add_argument("--watchers", type=int, default=20, help="fan-out watchers (0: no fan-out part)")
    p.add_argument("--fanout-size", type=int, default=2000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = run(tuple(args.sizes), args.changes, None, tuple(args.impls), args.watchers, args.fanout_size)
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
