"""ernie-mesh as a drill system: a Consul dev agent, one engine agent per engine (so each can be
restarted on its own in a rolling drill), one gateway agent with its Envoy."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import tomli_w

from agent.catalog.consul import ConsulCatalog
from agent.local.consul_dev import ConsulDev
from agent.local.ports import free_port, free_ports
from agent.local.procs import ManagedProcess, mesh_command
from agent.local.wait import wait_until
from agent.secret_files import ensure_secret
from bench.engines import EngineSettings, kill_group
from bench.keys import keys_file
from bench.system import Progress, System

SERVICE = "ernie"
NODE = "drill"
CLUSTER = "ernie"
DRAIN_TIMEOUT_S = 300.0


class EngineAgentProc:
    """`ernie-mesh engine` supervising one engine."""

    def __init__(
        self,
        workdir: Path,
        consul_address: str,
        settings: EngineSettings,
        engine_port: int,
        index: int,
        count: int,
        agent_settings: dict[str, Any],
        engine_args: tuple[str, ...] = (),
    ):
        self.engine_port = engine_port
        self.port = free_port()
        self.instance_id = ""  # the agent's name for it (agent/naming.py), learnt from its /instances
        self.config_path = workdir / f"engine-agent-{engine_port}.toml"
        token_file = workdir / f"control-token-{engine_port}"  # POST /drain needs it
        self._token = ensure_secret(token_file)
        engine = settings.agent_engine(engine_port, index, count)
        engine["args"] = [*engine.get("args", ()), *engine_args]
        self.config_path.write_text(
            tomli_w.dumps(
                {
                    "listen": f"127.0.0.1:{self.port}",
                    "node": NODE,
                    "advertise_address": "127.0.0.1",  # a one-host mesh: loopback registered on purpose
                    "log_dir": str(workdir / "logs"),
                    "control_token_file": str(token_file),
                    **agent_settings,
                    "consul": {"address": consul_address, "service": SERVICE},
                    "engines": [engine],
                }
            )
        )
        self.log_path = workdir / "logs" / f"engine-agent-{engine_port}.log"
        self.proc: ManagedProcess | None = None
        self._http = httpx.Client(timeout=2.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EngineAgentProc:
        self.proc = ManagedProcess(
            f"engine-agent-{self.engine_port}", mesh_command("engine", "--config", str(self.config_path)), self.log_path
        ).start()
        return self

    def instance(self) -> dict[str, Any] | None:
        """The agent's view of its engine (found by port: the agent runs this one engine)."""
        try:
            instances: list[dict[str, Any]] = self._http.get(f"{self.url}/instances").json()["instances"]
            for i in instances:
                if str(i["url"]).rstrip("/").endswith(f":{self.engine_port}"):
                    self.instance_id = str(i["id"])
                    return i
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        return None

    def engine_pid(self) -> int | None:
        inst = self.instance()
        return inst.get("pid") if inst else None

    def drain(self) -> None:
        if not self.instance_id and self.instance() is None:
            raise RuntimeError(f"engine agent {self.url} does not list the engine on :{self.engine_port}")
        r = self._http.post(f"{self.url}/drain/{self.instance_id}", headers={"Authorization": f"Bearer {self._token}"})
        r.raise_for_status()

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc is not None:
            self.proc.stop(timeout_s)


class MeshSystem(System):
    name = "mesh"

    def __init__(
        self,
        settings: EngineSettings,
        engines: int,
        workdir: Path,
        progress: Progress,
        agent_settings: dict[str, Any] | None = None,
        gateway_settings: dict[str, Any] | None = None,
    ):
        super().__init__(settings, engines, workdir, progress)
        self.gateway_settings = dict(gateway_settings or {})  # more gateway.toml tables ([routing] ...)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.agent_settings = dict(agent_settings or {})
        self.engine_ports = free_ports(engines)
        self.consul = ConsulDev(
            node="ernie-drill",
            data_dir=str(self.workdir / "consul"),
            log_path=str(self.workdir / "logs" / "consul.log"),
        )
        (self.workdir / "consul").mkdir(exist_ok=True)
        self.agents: list[EngineAgentProc] = []
        self.gateway: ManagedProcess | None = None
        listen, admin, xds, metrics = free_ports(4)
        self.gw_ports = {"listen": listen, "envoy_admin": admin, "xds": xds, "metrics": metrics}
        self.gw_run_dir = self.workdir / "gateway"
        self.gw_config = self.workdir / "gateway.toml"
        self._admin = httpx.Client(timeout=1.0)
        self._catalog: ConsulCatalog | None = None
        self._consul_frozen = False
        self._orphans: list[tuple[int, int]] = []  # (pid, port) of engines whose agent was killed

    @property
    def base_url(self) -> str:  # type: ignore[override]
        return f"http://127.0.0.1:{self.gw_ports['listen']}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.gw_ports['envoy_admin']}"

    def describe(self) -> str:
        return (
            f"Consul {self.consul.address}, {self.n} engine agent(s), gateway Envoy {self.base_url} "
            f"(admin {self.admin_url})"
        )

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.consul.start()
        self._catalog = ConsulCatalog(self.consul.address)
        self.progress(
            f"mesh: Consul on {self.consul.address}; starting {self.n} engine agent(s) "
            f"({self.settings.kind} engines) and the gateway"
        )
        for i, port in enumerate(self.engine_ports):
            extra = ("--crash-at-start-if-exists", str(self.crash_flag(i))) if self.settings.kind == "sim" else ()
            self.agents.append(
                EngineAgentProc(
                    self.workdir, self.consul.address, self.settings, port, i, self.n, self.agent_settings, extra
                ).start()
            )
        self.gw_config.write_text(
            tomli_w.dumps(
                {
                    "name": "drill-gw",
                    "run_dir": str(self.gw_run_dir),
                    **{k: f"127.0.0.1:{p}" for k, p in self.gw_ports.items()},
                    "consul": {"address": self.consul.address, "service": SERVICE},
                    # keys on, as users run it: the load, probes and slow clients send bench.keys' key
                    "edge": {"api_keys": keys_file(self.workdir / "keys")},
                    **self.gateway_settings,
                }
            )
        )
        self.start_gateway()
        self.progress(f"mesh: {self.describe()}")

    def start_gateway(self) -> None:
        self.gateway = ManagedProcess(
            "gateway",
            mesh_command("gateway", "--config", str(self.gw_config)),
            self.workdir / "logs" / "gateway-agent.log",
        ).start()

    def crash_flag(self, i: int) -> Path:
        """While this file exists, engine i's simulated engine fails at start (a crash loop)."""
        return self.workdir / f"crash-at-start-{self.engine_ports[i]}"

    def stop(self) -> None:
        """SIGTERM to the gateway and every engine agent at once (each drains on its own), then wait."""
        if self._consul_frozen:
            self.control_plane_start("consul-freeze")
        procs = [p for p in [self.gateway, *(a.proc for a in self.agents)] if p is not None]
        for p in procs:
            p.signal(signal.SIGTERM)
        for p in procs:
            p.stop(60.0)
        self._kill_envoy()
        self._kill_orphans()
        self.consul.stop()

    def _kill_orphans(self) -> None:
        """Engines left running by a killed engine agent (the drill's, recognised by their port)."""
        for pid, port in self._orphans:
            try:
                p = psutil.Process(pid)
                if "--port" in (cmd := p.cmdline()) and str(port) in cmd:
                    self.progress(f"mesh: engine pid {pid} (:{port}) outlived its killed agent: stopping it")
                    p.kill()
                    p.wait(5)
            except psutil.Error:
                pass

    def _kill_envoy(self) -> None:
        """Envoy runs in its own session (it outlives its agent by design): stop ours if it lingers."""
        record = self.gw_run_dir / "envoy.json"
        try:
            pid = json.loads(record.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return
        try:
            p = psutil.Process(pid)
            if str(self.gw_run_dir) in " ".join(p.cmdline()):
                p.kill()
                p.wait(5)
        except psutil.Error:
            pass

    def wait_all_in_rotation(self, timeout_s: float) -> None:
        try:
            super().wait_all_in_rotation(timeout_s)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.log_tails()}") from None

    def log_tails(self, lines: int = 12) -> str:
        """The last lines of the gateway agent's, Envoy's and each engine agent's log (for a failure)."""
        logs = [self.workdir / "logs" / "gateway-agent.log", self.gw_run_dir / "envoy.log"]
        logs += [a.log_path for a in self.agents]
        out = []
        for path in logs:
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                tail = ["(no log)"]
            out.append(f"--- {path}:\n" + "\n".join(tail))
        return "\n".join(out)

    # --- observation --------------------------------------------------------------------------
    def in_rotation(self) -> frozenset[int]:
        """Engines Envoy would pick for a new request: present in its cluster and plainly healthy
        (not draining, not ejected by outlier detection)."""
        try:
            text = self._admin.get(f"{self.admin_url}/clusters").text
        except httpx.HTTPError:
            return frozenset()
        flags: dict[int, str] = {}
        prefix = f"{CLUSTER}::"
        for line in text.splitlines():
            if not line.startswith(prefix):
                continue
            parts = line[len(prefix) :].split("::")
            if len(parts) == 3 and parts[1] == "health_flags":
                flags[int(parts[0].rpartition(":")[2])] = parts[2]
        return frozenset(i for i, p in enumerate(self.engine_ports) if flags.get(p) == "healthy")

    def control_plane_ok(self) -> bool:
        """Consul answers with every instance passing, the gateway agent serves its metrics and
        every relay process runs and accepts connections."""
        if self._catalog is None:  # not started
            return False
        try:
            _idx, entries = self._catalog.instances(SERVICE)
            passing = sum(1 for e in entries if e.status.value == "passing")
            metrics = httpx.get(f"http://127.0.0.1:{self.gw_ports['metrics']}/metrics", timeout=1)
            return passing == self.n and metrics.status_code == 200 and self.relays_ok()
        except Exception:  # noqa: BLE001 - Consul down or the gateway restarting: simply "not ok"
            return False

    def relay_pids(self) -> list[int]:
        """The relay processes the gateway agent started (its records in run_dir), alive or not."""
        pids = []
        for record in sorted(self.gw_run_dir.glob("relay-*.json")):
            try:
                pids.append(int(json.loads(record.read_text())["pid"]))
            except (OSError, ValueError, KeyError):
                continue
        return pids

    def relays_ok(self) -> bool:
        pids = self.relay_pids()
        if not pids:
            return False
        for pid in pids:
            try:
                p = psutil.Process(pid)
                cmd = p.cmdline()
                if p.status() == psutil.STATUS_ZOMBIE or "--socket" not in cmd:
                    return False
                sock = cmd[cmd.index("--socket") + 1]
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(1.0)
                    s.connect(sock)
            except (psutil.Error, OSError, IndexError):
                return False
        return True

    def envoy_pid(self) -> int | None:
        try:
            pid = int(json.loads((self.gw_run_dir / "envoy.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None
        return pid if psutil.pid_exists(pid) else None

    def agent_view(self, i: int) -> dict[str, Any] | None:
        return self.agents[i].instance()

    def engine_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.engine_ports[i]}"

    def engine_pid(self, i: int) -> int | None:
        return self.agents[i].engine_pid()

    # --- faults -------------------------------------------------------------------------------
    def kill(self, i: int) -> None:
        kill_group(self.engine_pid(i))

    def after_kill(self, i: int) -> None:
        """Nothing to do: the engine agent restarts its engine (after restart_backoff_initial_s)."""

    def restart_crashed(self, i: int, died_at: float) -> None:
        """Nothing to do: the engine agent restarts its engine (after restart_backoff_initial_s)."""

    def crash_at_start(self, i: int, on: bool) -> None:
        if self.settings.kind != "sim":
            raise NotImplementedError("the crash-loop drill needs the simulated engine")
        flag = self.crash_flag(i)
        if on:
            flag.write_text("the drill makes this engine fail at start while this file exists\n")
            kill_group(self.engine_pid(i))
        else:
            flag.unlink(missing_ok=True)

    def kill_part(self, what: str) -> int:
        """SIGKILL of the process alone (its children, if any, live on as after a crash)."""
        if what == "envoy":
            pid = self.envoy_pid()
        elif what == "relay":
            pid = next(iter(self.relay_pids()), None)
        elif what.startswith("engine-agent-"):
            agent = self.agents[int(what.rpartition("-")[2])]
            engine = agent.engine_pid()
            if engine is not None:
                self._orphans.append((engine, agent.engine_port))
            pid = agent.proc.pid if agent.proc is not None and agent.proc.alive() else None
            if pid is not None and agent.proc is not None:
                agent.proc.kill()
                return pid
        else:
            raise ValueError(what)
        if pid is None:
            raise RuntimeError(f"mesh: no running {what} to kill")
        os.kill(pid, signal.SIGKILL)
        return pid

    def start_engine_agent(self, i: int) -> None:
        self.agents[i].start()

    def roll_stop(self, i: int) -> None:
        """Drain through the engine agent, then stop the agent (nothing left to drain)."""
        agent = self.agents[i]
        agent.drain()
        wait_until(
            lambda: (agent.instance() or {}).get("state") == "drained",
            DRAIN_TIMEOUT_S,
            interval_s=0.1,
            what=f"{agent.instance_id} drained",
        )
        agent.stop(30.0)

    def roll_start(self, i: int) -> None:
        self.agents[i].start()

    def roll_wait(self, i: int, timeout_s: float) -> None:
        """Back when Envoy routes to it again (the agent saw a canary succeed and said passing)."""
        wait_until(lambda: i in self.in_rotation(), timeout_s, interval_s=0.1, what=f"engine {i} back in rotation")

    def control_plane_stop(self, what: str) -> None:
        if what == "consul":
            self.consul.stop()
        elif what == "consul-freeze":
            if self.consul.proc is None:
                raise RuntimeError("mesh: Consul is not running")
            self.consul.proc.send_signal(signal.SIGSTOP)
            self._consul_frozen = True
        elif what == "gateway":
            if self.gateway is None:
                raise RuntimeError("mesh: the gateway agent was not started")
            self.gateway.kill()  # SIGKILL of the agent alone: its Envoy keeps serving
        else:
            raise ValueError(what)

    def control_plane_start(self, what: str) -> None:
        if what == "consul":
            self.consul.start()
        elif what == "consul-freeze":
            if self.consul.proc is not None:
                self.consul.proc.send_signal(signal.SIGCONT)
            self._consul_frozen = False
        elif what == "gateway":
            self.start_gateway()
        else:
            raise ValueError(what)


def wait_gateway_ready(system: MeshSystem, timeout_s: float) -> None:
    t0 = time.monotonic()
    system.wait_all_in_rotation(timeout_s)
    system.progress(f"mesh: all {system.n} engines in rotation in Envoy after {time.monotonic() - t0:.1f}s")
