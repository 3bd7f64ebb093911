"""`ernie-mesh up`'s orchestration: start the parts in order, wait until the mesh is healthy, watch
it in the foreground, and stop everything in the right order leaving no process behind.

Every child runs in its own session, so a Ctrl-C in the terminal reaches only `up`, which then
stops the parts itself: UI, Prometheus, engine agents (each drains its engine), gateway, Consul.
The parts, their start and stop order, stop timeouts and which deaths are fatal: `agent/local/parts.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from collections.abc import Callable

import httpx

from agent.catalog.base import CatalogError, CatalogEntry, VerdictCause
from agent.catalog.consul import ConsulCatalog
from agent.gateway import keys
from agent.gateway.rendered import write_private
from agent.local.consul_acl import consul_version
from agent.local.binaries import MissingBinary, consul_binary, find_binary
from agent.local.parts import Need, Part, part_of, plan_parts, stop_order
from agent.local.plan import LOCAL_KEY_NAME, REPO_DIR, MeshPlan
from agent.local.ports import port_open
from agent.local.procs import AdoptedProcess, ManagedProcess, Stoppable, child_env, mesh_command
from agent.local.runstate import (
    AddedEngine,
    Proc,
    UpState,
    descendants,
    drop_added,
    drop_stale_added,
    kill,
    proc_identity,
    process_name,
    read_added,
    wait_gone,
    write_state,
)
from agent.net import can_bind
from agent.secret_files import ensure_secret

POLL_S = 0.25
HEARTBEAT_S = 15.0
TREE_REFRESH_S = 5.0
CONSUL_START_TIMEOUT_S = 30.0
GATEWAY_START_TIMEOUT_S = 60.0
UI_START_TIMEOUT_S = 120.0
PROMETHEUS_START_TIMEOUT_S = 30.0
DASHBOARD_START_TIMEOUT_S = 60.0
LOCAL_DATACENTER = "dc1"  # the dev agent's (consul/dev.hcl sets none: Consul's default)
LOCAL_SCRAPE_S = 5.0  # the local Prometheus scrapes and re-reads Consul every 5 s (production: 15 s)
ROUTE_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 2.0
PROMETHEUS_FAILED_STOP_TIMEOUT_S = 5.0
KILL_WAIT_S = 5.0


class Interrupted(Exception):
    """A stop was requested (Ctrl-C, SIGTERM, `ernie-mesh down`) before the mesh was healthy."""


class StartError(Exception):
    """A part of the mesh failed to start; the message says which and where its log is."""


class Console:
    """Progress for humans (stdout, or stderr with --json) and JSON events for scripts (stdout)."""

    def __init__(self, json_mode: bool):
        self.json_mode = json_mode
        self.human = sys.stderr if json_mode else sys.stdout
        self.t0 = time.monotonic()

    def _print(self, text: str) -> None:
        print(text, file=self.human, flush=True)

    def step(self, text: str) -> None:
        self._print(f"==> {text}")

    def info(self, text: str) -> None:
        self._print(f"    {text}")

    def warn(self, text: str) -> None:
        self._print(f"!!  {text}")

    def block(self, text: str) -> None:
        self._print(text)

    def event(self, **fields: object) -> None:
        if self.json_mode:
            print(json.dumps(fields), flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def http_status(url: str, headers: dict[str, str] | None = None) -> int | None:
    try:
        return httpx.get(url, timeout=HTTP_TIMEOUT_S, headers=headers).status_code
    except httpx.HTTPError:
        return None


def models_listed(url: str, headers: dict[str, str]) -> bool:
    """GET url answers 200 with at least one model (an OpenAI model list)."""
    try:
        r = httpx.get(url, timeout=HTTP_TIMEOUT_S, headers=headers)
        return r.status_code == 200 and bool(r.json().get("data"))
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


class Mesh:
    def __init__(self, plan: MeshPlan, console: Console, stop: threading.Event, force: threading.Event):
        self.plan = plan
        self.parts = plan_parts(plan)
        self.out = console
        self.stop_requested = stop
        self.force = force
        self.procs: dict[str, ManagedProcess] = {}
        self.known: dict[int, Proc] = {}  # every process of the mesh seen so far, children included
        self.catalog = ConsulCatalog(plan.consul_address)
        me = proc_identity("up", os.getpid())
        self.state = UpState(
            pid=me.pid, start_ticks=me.start_ticks, run_dir=str(plan.run_dir), urls=plan.urls(), plan=plan.summary()
        )
        self._last_tree_s = 0.0

    # --- bookkeeping ---------------------------------------------------------------------------

    def save(self, phase: str | None = None, step: str | None = None) -> None:
        if phase:
            self.state.phase = phase
        if step is not None:
            self.state.step = step
        self.state.processes = [asdict(p) for p in self.known.values()]
        write_state(self.plan.state_path, self.state)

    def refresh_tree(self) -> None:
        """Record every descendant of our children (vLLM, its engine cores, Envoy) for the final sweep,
        and the engine agents `ernie-mesh add` started with theirs (they are stopped with ours)."""
        changed = False
        roots = [(name, mp.pid) for name, mp in self.procs.items() if mp.pid is not None]
        for rec in self.added():
            roots.append((rec.name, rec.pid))
            if rec.pid not in self.known:
                self.known[rec.pid] = rec.proc()
                changed = True
        for name, root in roots:
            for pid in descendants([root]):
                if pid not in self.known or not self.known[pid].alive():
                    self.known[pid] = proc_identity(f"{name}/{process_name(pid)[:60]}", pid)
                    changed = True
        self._last_tree_s = time.monotonic()
        if changed:
            self.save()

    def added(self) -> list[AddedEngine]:
        """The live engines `ernie-mesh add` added to this mesh."""
        return [r for r in read_added(self.plan.run_dir) if r.alive()]

    def _start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None
    ) -> ManagedProcess:
        """Start one process of a part (its log: <name>.log)."""
        mp = ManagedProcess(name, cmd, self.plan.log_dir / f"{name}.log", env=env, cwd=cwd).start()
        self.procs[name] = mp
        pid = mp.popen.pid
        self.known[pid] = proc_identity(name, pid)
        self.save()
        return mp

    def _part(self, process_name: str) -> Part:
        part = part_of(self.parts, process_name)
        if part is None:
            raise KeyError(f"{process_name!r} is no part of the mesh (agent/local/parts.py)")
        return part

    def _check_stop(self) -> None:
        if self.stop_requested.is_set():
            raise Interrupted()

    def _check_children(self) -> None:
        for name, mp in self.procs.items():
            if self._part(name).fatal_while_starting and not mp.alive():
                tail = "\n".join("      " + line for line in mp.log_tail(12).splitlines())
                raise StartError(
                    f"{name} exited with code {mp.returncode} while the mesh was starting; log {mp.log_path}:\n{tail}"
                )

    def _wait(
        self,
        predicate: Callable[[], object],
        timeout_s: float,
        what: str,
        on_poll: Callable[[float], None] | None = None,
    ) -> object:
        """Poll until `predicate` holds; a stop request or a dead child ends the wait early."""
        started = time.monotonic()
        while True:
            self._check_stop()
            self._check_children()
            try:
                value = predicate()
            except (httpx.HTTPError, CatalogError, OSError):
                value = None
            if value:
                return value
            waited = time.monotonic() - started
            if on_poll:
                on_poll(waited)
            if waited > timeout_s:
                raise StartError(f"{what}: not reached within {timeout_s:.0f}s")
            if time.monotonic() - self._last_tree_s > TREE_REFRESH_S:
                self.refresh_tree()
            self.stop_requested.wait(POLL_S)

    # --- start ---------------------------------------------------------------------------------

    def start(self, healthy_timeout_s: float) -> None:
        """Start the plan's parts in their start order, then wait until the engines pass and the gateway routes."""
        self.plan.log_dir.mkdir(parents=True, exist_ok=True)
        drop_stale_added(self.plan.run_dir)  # records of engines added to an earlier mesh
        self.save("starting", "starting Consul")
        starters: dict[str, Callable[[Part], None]] = {
            "consul": self.start_consul,
            "engine-agent": self.start_engines,
            "gateway": self.start_gateway,
            "ui": self.start_ui,
            "prometheus": self.start_prometheus,
            "dashboard": self.start_dashboard,
        }
        for part in sorted(self.parts, key=lambda part: part.start_order):
            starters[part.name](part)
        self.wait_engines(healthy_timeout_s)
        self.wait_route()
        self.save("healthy", "")

    def start_consul(self, part: Part) -> None:
        p = self.plan
        self.out.step(f"Consul dev agent on {p.consul_address} (DNS 127.0.0.1:{p.port(8600)})")
        (p.run_dir / "consul-ports.json").write_text(p.consul_ports_json())
        acl = p.consul_acl
        acl.create_secrets()  # -dev keeps nothing: a new mesh, new tokens
        binary = consul_binary()
        write_private(p.run_dir / "consul-acl.json", acl.agent_config(consul_version(binary)))
        self._start(part.name, p.consul_command(binary))
        self._wait(lambda: self.catalog.leader(), CONSUL_START_TIMEOUT_S, "Consul leader elected")
        acl.bootstrap(p.consul_address, p.service)
        self.catalog = ConsulCatalog(p.consul_address, token_file=str(acl.path("operator")))
        self.out.info(f"Consul UI: {p.consul_ui_url}; ACLs on (default deny), one token per role in {acl.directory}")
        keys.ensure_key(self.catalog, LOCAL_KEY_NAME, p.api_key_path)
        self.out.info(
            f"API key {LOCAL_KEY_NAME!r} in {p.api_key_path} (more: CONSUL_HTTP_TOKEN_FILE="
            f"{p.consul_acl.path('operator')} ernie-mesh keys --consul {p.consul_address} add <name>)"
        )

    def prepare_model(self) -> str:
        p = self.plan
        if p.engine_kind == "simulated":
            self.out.step(
                f"SIMULATED engines (no vLLM, no model): tokens are placeholders, model name {p.model_name!r}"
            )
            return ""
        chosen = p.builtin_model
        if chosen is None:
            self.out.step(f"model {p.model} (vLLM loads it; served as {p.model_name!r})")
            return p.model
        from agent.model import is_prepared

        dest = chosen.model_dir()
        if is_prepared(dest):
            self.out.step(f"model: {chosen.label}, cached in {dest}")
            return str(dest)
        self.out.step(f"model: preparing {chosen.label} (once; cached afterwards)")
        self.save(step="preparing the model")
        return self._run_model_prepare(chosen.name)

    def _run_model_prepare(self, name: str) -> str:
        cmd = [sys.executable, "-m", "agent.model", "prepare", "--model", name, "--json"]
        log_path = self.plan.log_dir / "model-prepare.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=str(REPO_DIR),
            )
            stdout, stderr = proc.stdout, proc.stderr
            if stdout is None or stderr is None:  # both are PIPEs: Popen always opens them
                raise RuntimeError("model preparation started without its output pipes")
            self.known[proc.pid] = proc_identity("model-prepare", proc.pid)

            def relay() -> None:
                for line in stderr:
                    log.write(line)
                    log.flush()
                    self.out.info(line.decode(errors="replace").rstrip())

            relay_thread = threading.Thread(target=relay, daemon=True)
            relay_thread.start()
            try:
                while proc.poll() is None:
                    if self.stop_requested.wait(POLL_S):
                        kill(self.known[proc.pid], signal.SIGKILL)
                        proc.wait()
                        raise Interrupted()
            finally:
                relay_thread.join(timeout=5)
                self.known.pop(proc.pid, None)
            out = stdout.read().decode(errors="replace")
        if proc.returncode != 0:
            raise StartError(f"model preparation failed (exit {proc.returncode}); see {log_path}")
        try:
            path: str = json.loads(out.strip().splitlines()[-1])["path"]
            return path
        except (ValueError, IndexError, KeyError):
            raise StartError(f"model preparation printed no path; see {log_path}") from None

    def start_engines(self, part: Part) -> None:
        """Prepare the model (once), then one engine agent per engine."""
        model_path = self.prepare_model()
        p = self.plan
        where = "CPU build" if not p.gpus else f"{p.gpus} GPU(s), one per engine"
        kind = "SIMULATED engine" if p.engine_kind == "simulated" else f"vLLM engine ({where})"
        self.out.step(f"{p.engines} engine agent(s), each supervising one {kind}")
        ensure_secret(p.control_token_path)  # their POST /drain needs it: `ernie-mesh drain --token-file`
        for i, name in enumerate(part.process_names()):
            config = p.run_dir / f"engine-{i + 1}.toml"
            config.write_text(p.engine_agent_toml(i, model_path))
            self._start(
                name,
                mesh_command(
                    "engine",
                    "--config",
                    str(config),
                    "--consul",
                    p.consul_address,
                    "--node",
                    p.node,
                    "--advertise-address",
                    "127.0.0.1",
                ),
                env=child_env(),
            )
            self.out.info(
                f"{p.instance_id(i)}: engine :{p.engine_port(i)}, agent http://127.0.0.1:{p.agent_port(i)}"
                f" (logs {p.log_dir}/{name}.log, {p.log_dir}/{p.instance_id(i)}.log)"
            )

    def start_gateway(self, part: Part) -> None:
        p = self.plan
        self.out.step(f"gateway agent + Envoy: OpenAI API on {p.api_url}")
        config = p.run_dir / "gateway.toml"
        config.write_text(p.gateway_toml())
        self._start(
            part.name,
            mesh_command(
                "gateway",
                "--config",
                str(config),
                "--consul",
                p.consul_address,
                "--name",
                p.node,
                "--advertise-address",
                "127.0.0.1",
            ),
            env=child_env(),
        )
        self._wait(
            lambda: port_open(p.host if p.host not in ("0.0.0.0", "::") else "127.0.0.1", p.gateway_port),
            GATEWAY_START_TIMEOUT_S,
            f"Envoy listening on :{p.gateway_port}",
        )
        envoy_log = p.run_dir / "gateway" / "envoy.log"
        link = p.log_dir / "envoy.log"
        if not link.exists() and not link.is_symlink():
            link.symlink_to(envoy_log)

    def start_ui(self, part: Part) -> None:
        p = self.plan
        self.out.step(f"Chainlit UI on {p.ui_url}")
        self._start(part.name, p.ui_command(), env=p.ui_env(), cwd=str(REPO_DIR / "ui"))
        self._wait(lambda: http_status(p.ui_url) == 200, UI_START_TIMEOUT_S, "Chainlit UI answering")

    def start_prometheus(self, part: Part) -> None:
        """With a Prometheus that has Consul service discovery (deploy/prometheus/install.sh). Optional
        without the dashboard (skipped with a note); required with it (`up`'s preflight checked the
        binary; a Prometheus that does not start stops `up`)."""
        p = self.plan
        required = part.need is not Need.OPTIONAL
        binary, why_not = usable_prometheus()
        if binary is None:
            if required:
                raise StartError(f"Prometheus: {why_not}")
            self.out.info(f"Prometheus skipped: {why_not}")
            return
        if not can_bind("127.0.0.1", p.prometheus_port):
            if required:
                raise StartError(f"Prometheus: port {p.prometheus_port} is in use")
            self.out.info(f"Prometheus skipped: port {p.prometheus_port} is in use")
            return
        from agent.local import prometheus as prom

        self.out.step(f"Prometheus on {p.prometheus_url} (targets from Consul, scraped every {LOCAL_SCRAPE_S:.0f}s)")
        config = prom.write_config(
            p.run_dir / "prometheus",
            p.consul_address,
            scrape_interval_s=LOCAL_SCRAPE_S,
            sd_refresh_interval_s=LOCAL_SCRAPE_S,
            engine_service=p.service,
            datacenter=LOCAL_DATACENTER,
        )
        mp = self._start(
            part.name,
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={p.run_dir / 'prometheus' / 'data'}",
                f"--web.listen-address=127.0.0.1:{p.prometheus_port}",
            ],
        )

        def ready() -> bool:
            if not mp.alive():
                raise StartError(f"exited with code {mp.returncode}, log {mp.log_path}")
            return http_status(f"{p.prometheus_url}/-/ready") == 200

        try:
            self._wait(ready, PROMETHEUS_START_TIMEOUT_S, "Prometheus ready")
        except StartError as e:
            if required:
                raise StartError(f"Prometheus did not start ({str(e).splitlines()[0]})") from None
            self.out.warn(f"Prometheus did not start ({str(e).splitlines()[0]}); the mesh runs without it")
            self._stop_one(part.name, PROMETHEUS_FAILED_STOP_TIMEOUT_S)
            self.procs.pop(part.name, None)

    def start_dashboard(self, part: Part) -> None:
        p = self.plan
        self.out.step(f"dashboard on {p.dashboard_url} (reads Prometheus and Consul)")
        self._start(part.name, p.dashboard_command(), env=child_env())
        self._wait(
            lambda: http_status(f"{p.dashboard_url}/api/config") == 200,
            DASHBOARD_START_TIMEOUT_S,
            "dashboard answering",
        )

    def _instances(self) -> dict[str, CatalogEntry]:
        _idx, entries = self.catalog.instances(self.plan.service)
        return {e.instance_id: e for e in entries}

    def wait_engines(self, timeout_s: float) -> None:
        p = self.plan
        what = (
            "vLLM loads the model, then a first canary generation must succeed"
            if p.engine_kind == "vllm"
            else "simulated engines start"
        )
        self.out.step(f"waiting for {p.engines} engine(s) to pass their health checks ({what})")
        self.save(step="engines warming up")
        seen: dict[str, str] = {}
        last_beat = [time.monotonic()]

        def all_passing() -> bool:
            now = self._instances()
            for iid, e in sorted(now.items()):
                state = e.verdict.state.value
                if seen.get(iid) != state:
                    seen[iid] = state
                    self.out.info(f"{iid}: {state}" + (f" ({e.verdict.reason})" if e.verdict.reason else ""))
                if e.verdict.cause is VerdictCause.CRASH_LOOP:
                    raise StartError(f"{iid}: {e.verdict.reason}; engine log {p.log_dir / (iid + '.log')}")
            return sum(1 for e in now.values() if e.verdict.state.value == "passing") >= p.engines

        def beat(waited: float) -> None:
            if time.monotonic() - last_beat[0] >= HEARTBEAT_S:
                last_beat[0] = time.monotonic()
                try:
                    now = self._instances()
                except CatalogError:
                    now = {}
                detail = "; ".join(
                    f"{iid} {e.verdict.state.value}: {e.verdict.reason}" for iid, e in sorted(now.items())
                )
                self.out.info(f"... {waited:.0f}s: {detail or 'no instance registered yet'}")

        self._wait(all_passing, timeout_s, f"{p.engines} engine(s) passing", on_poll=beat)

    def wait_route(self) -> None:
        """The gateway routes: /v1/models answers through Envoy and lists a model (the snapshot
        reached the gateway's relay, which lists the models of passing instances)."""
        p = self.plan
        self._wait(
            lambda: models_listed(f"{p.api_url}/models", {"Authorization": f"Bearer {p.api_key()}"}),
            ROUTE_TIMEOUT_S,
            f"{p.api_url}/models answering through Envoy",
        )

    # --- foreground ----------------------------------------------------------------------------

    def monitor(self) -> int:
        """Until a stop is requested: report verdict changes and dead parts. 1 if a vital part died."""
        seen: dict[str, str] = {}
        reported_dead: set[str] = set()
        try:
            seen = {iid: e.verdict.state.value for iid, e in self._instances().items()}
        except CatalogError:
            pass
        while not self.stop_requested.wait(1.0):
            for name, mp in self.procs.items():
                if mp.alive() or name in reported_dead:
                    continue
                reported_dead.add(name)
                msg = f"{name} exited with code {mp.returncode}; log {mp.log_path}"
                if self._part(name).fatal_while_running:
                    self.out.warn(f"{msg}: the mesh cannot work without it; stopping everything")
                    return 1
                if mp.returncode == 0:  # stopped on request (`ernie-mesh remove`, a SIGTERM)
                    self.out.info(f"{time.strftime('%H:%M:%S')} {name} stopped (exit 0); log {mp.log_path}")
                else:
                    self.out.warn(msg)
            try:
                now = self._instances()
            except CatalogError:
                continue
            for iid in sorted(set(seen) | set(now)):
                e = now.get(iid)
                state = e.verdict.state.value if e else "deregistered"
                if seen.get(iid) != state:
                    reason = f" ({e.verdict.reason})" if e and e.verdict.reason else ""
                    self.out.info(f"{time.strftime('%H:%M:%S')} {iid}: {seen.get(iid, 'new')} -> {state}{reason}")
                    seen[iid] = state
            if time.monotonic() - self._last_tree_s > TREE_REFRESH_S:
                self.refresh_tree()
        return 0

    # --- stop ----------------------------------------------------------------------------------

    def _stop_one(self, name: str, timeout_s: float) -> None:
        mp = self.procs.get(name)
        if mp is None or mp.proc is None:
            return
        self._stop_together([mp], timeout_s)

    def _stop_together(self, procs: list[Stoppable], timeout_s: float) -> None:
        for mp in procs:
            mp.signal(signal.SIGTERM)
        self._await_exit(procs, timeout_s)

    def _await_exit(self, procs: list[Stoppable], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(mp.alive() for mp in procs) and time.monotonic() < deadline and not self.force.is_set():
            time.sleep(0.1)
        for mp in procs:
            if mp.alive():
                self.out.warn(f"{mp.name} did not stop in time: killing it")
            mp.kill_group()
            try:
                mp.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                self.out.warn(f"{mp.name} (pid {mp.pid}) survived SIGKILL")

    def stop(self) -> list[str]:
        """Stop the parts in their stop order, then sweep: returns the processes that had to be killed at the end."""
        started = time.monotonic()
        self.refresh_tree()
        self.save("stopping", "stopping the UI")
        self.out.step("stopping the mesh (Ctrl-C again to kill everything at once)")
        added: list[AddedEngine] = []
        for part in stop_order(self.parts):
            procs: list[Stoppable] = [mp for name, mp in self.procs.items() if part.owns(name) and mp.proc is not None]
            mine = [r for r in self.added() if part.owns(r.name)]  # read now: an `add` may just have finished
            added += mine
            procs += [AdoptedProcess(r.proc()) for r in mine]
            if not procs:
                continue
            if part.stop_step:
                self.save(step=part.stop_step)
            self.out.info(part.stop_message(sum(1 for mp in procs if mp.alive()) or len(procs)))
            self._stop_together(procs, part.stop_timeout_s)
        leftovers = [p for p in self.known.values() if p.alive()]
        for p in leftovers:
            self.out.warn(f"left behind, killing: {p.name} (pid {p.pid})")
            kill(p, signal.SIGKILL)
        survivors = wait_gone(leftovers, KILL_WAIT_S)
        for p in survivors:
            self.out.warn(f"still running after SIGKILL: {p.name} (pid {p.pid})")
        for r in added:
            drop_added(self.plan.run_dir, r.name)
        self.out.step(
            f"stopped in {time.monotonic() - started:.1f}s"
            + ("; no process left behind" if not survivors else f"; {len(survivors)} process(es) survived")
        )
        self.save("stopped", "")
        return [p.name for p in leftovers]


def usable_prometheus() -> tuple[str | None, str]:
    """(the Prometheus binary `up` runs, "") or (None, why there is none usable)."""
    try:
        from agent.local import prometheus as prom

        binary = find_binary("prometheus", "deploy/prometheus/install.sh (or scripts/install.sh core) installs one")
    except (ImportError, MissingBinary) as e:
        return None, str(e)
    promtool = prom.promtool_beside(binary)
    if promtool is None or not prom.has_consul_sd(promtool):
        return None, (f"{binary} has no Consul service discovery (deploy/prometheus/install.sh installs one that has)")
    return binary, ""
