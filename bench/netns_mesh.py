"""ernie-mesh on several hosts, each a network namespace of its own (bench/netns.py): real `consul
agent` servers and clients, engine agents with simulated engines, gateways (`ernie-mesh gateway`:
agent, Envoy, relays) — for the drills a single host cannot show: the loss of the Consul leader
in a 3-server cluster, and the loss of a whole gateway host with two gateways behind one name.

Hosts (one namespace each, on one bridge; the drill itself runs in the root namespace and reaches
every host through the bridge):
  consul1..N   Consul servers (N = 3, or 1), `bootstrap_expect` N; DNS on port 53
  engines      a Consul client; one engine agent per simulated engine (as the Ansible roles deploy)
  gw / gw-a, gw-b  a Consul client and one gateway each, every gateway on the same port
  client       (the gateway-host drill) the clients, resolving `ernie-gateway.service.consul`
               through Consul's DNS (/etc/netns/<ns>/resolv.conf, which `ip netns exec` mounts)

Every agent talks to its host's local Consul client on 127.0.0.1:8500, as on a deployed host
(`gateway_consul="follower"`: the gateways talk to a server that is not the leader instead).
Consul's settings are the Ansible role's (deploy/ansible/roles/consul/vars/main.yml) without ACLs,
TLS and gossip encryption: default Raft timing, `only_passing` DNS, `check_update_interval` 0s.
Needs root and iproute2.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from agent.local.binaries import consul_binary
from agent.local.procs import ManagedProcess, mesh_command
from agent.naming import GATEWAY_SERVICE
from agent.secret_files import ensure_secret
from bench.engines import EngineSettings
from bench.keys import keys_file
from bench.load import LoadConfig, LoadGenerator, Result
from bench.netns import InNamespace, NetnsLab, available, exec_in
from bench.system import Progress, System

SERVICE = "ernie"
CLUSTER = "ernie"
GATEWAY_PORT = 8080
GATEWAY_METRICS_PORT = 9102
ENVOY_ADMIN = "127.0.0.1:9901"
CONSUL_HTTP_PORT = 8500
ENGINE_PORT_BASE = 8001
ENGINE_AGENT_PORT_BASE = 9101
GATEWAY_NAME = f"{GATEWAY_SERVICE}.service.consul"  # what the clients of the gateway-host drill resolve
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
# The gateway-host drill's clients: the openai SDK as an application would configure it — its own
# retries (2, the SDK's default), a connect timeout, and a read timeout that notices a gateway that
# went silent (a lost host sends no RST: without it a request waits for the whole request timeout).
CLIENT_MAX_RETRIES = 2
CLIENT_CONNECT_TIMEOUT_S = 2.0
CLIENT_READ_TIMEOUT_S = 5.0


class ConsulAgent:
    """One `consul agent` (server or client) inside a host's namespace."""

    def __init__(
        self,
        lab: NetnsLab,
        host: str,
        servers: list[str],
        server: bool,
        logs: Path,
        datacenter: str = "dc1",
        wan_join: tuple[str, ...] = (),
    ):
        """`servers`: its datacenter's servers; `wan_join`: other datacenters' servers (a server's
        WAN federation)."""
        self.lab, self.host, self.server = lab, host, server
        h = lab.hosts[host]
        self.address = h.address
        data = h.root / "consul"
        data.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "node_name": host,
            "datacenter": datacenter,
            "data_dir": str(data / "data"),
            "bind_addr": h.address,
            "advertise_addr": h.address,
            "client_addr": "0.0.0.0",  # the local agents use 127.0.0.1, the drill the host's address
            "ports": {"dns": 53, "http": CONSUL_HTTP_PORT, "grpc": -1},
            "retry_join": [lab.hosts[s].address for s in servers if s != host],
            "retry_interval": "1s",
            "server": server,
            "leave_on_terminate": not server,
            "dns_config": {"only_passing": True, "enable_truncate": True},
            "check_update_interval": "0s",
            "disable_update_check": True,
            "log_level": "info",
        }
        if server:
            config["bootstrap_expect"] = len(servers)
            if wan_join:
                config["retry_join_wan"] = [lab.hosts[s].address for s in wan_join]
        self.config_path = data / "consul.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log_path = logs / f"consul-{host}.log"
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{CONSUL_HTTP_PORT}"

    def start(self) -> ConsulAgent:
        cmd = exec_in(self.lab.hosts[self.host].netns, [consul_binary(), "agent", f"-config-file={self.config_path}"])
        self.proc = ManagedProcess(f"consul-{self.host}", cmd, self.log_path).start()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def kill(self) -> int:
        """SIGKILL (`ip netns exec` execs the agent: the pid is consul's own)."""
        if self.proc is None or not self.proc.alive() or self.proc.pid is None:
            raise RuntimeError(f"consul on {self.host} is not running")
        pid = self.proc.pid
        self.proc.kill()
        return pid

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(STOP_TIMEOUT_S)


class NetnsMeshSystem(System):
    name = "mesh"

    def __init__(
        self,
        settings: EngineSettings,
        engines: int,
        workdir: Path,
        progress: Progress,
        servers: int = 3,
        gateways: int = 1,
        dns_clients: bool = False,
        gateway_consul: str = "local",
        agent_settings: dict[str, Any] | None = None,
    ):
        super().__init__(settings, engines, workdir, progress)
        if settings.kind != "sim":
            raise ValueError("the netns drills run simulated engines")
        why = available()
        if why:
            raise RuntimeError(f"the netns drills need network namespaces: {why}")
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.server_hosts = [f"consul{i + 1}" for i in range(servers)]
        self.gateway_hosts = ["gw"] if gateways == 1 else [f"gw-{chr(ord('a') + i)}" for i in range(gateways)]
        self.dns_clients = dns_clients
        # the gateways' Consul: "local" (a client agent on the gateway's host, as the Ansible roles
        # deploy) or "follower" (no client: the gateway talks to a server that is not the leader)
        if gateway_consul not in ("local", "follower"):
            raise ValueError(f"gateway_consul: local or follower, not {gateway_consul!r}")
        self.gateway_consul = gateway_consul
        self.gateway_consul_server = ""  # the server the gateways talk to (gateway_consul = follower)
        names = [*self.server_hosts, "engines", *self.gateway_hosts, *(["client"] if dns_clients else [])]
        self.lab = NetnsLab(self.workdir, names)
        self.agent_settings = dict(agent_settings or {})
        self.consul: dict[str, ConsulAgent] = {}
        self.engine_agents: list[ManagedProcess] = []
        self.gateways: dict[str, ManagedProcess] = {}
        self.lost: set[str] = set()  # hosts cut off by the drill
        self._in_ns: dict[str, InNamespace] = {}
        self._http = httpx.Client(timeout=2.0)
        self.load: LoadGenerator | None = None
        self._resolv_dir: Path | None = None

    # --- addresses ----------------------------------------------------------------------------
    def address(self, host: str) -> str:
        return self.lab.hosts[host].address

    gateway_port = GATEWAY_PORT  # every gateway's, on its own host

    def gateway_url(self, host: str) -> str:
        return f"http://{self.address(host)}:{GATEWAY_PORT}"

    @property
    def base_url(self) -> str:  # type: ignore[override]
        return self.gateway_url(self.gateway_hosts[0])

    def engine_url(self, i: int) -> str:
        return f"http://{self.address('engines')}:{ENGINE_PORT_BASE + i}"

    def agent_url(self, i: int) -> str:
        return f"http://{self.address('engines')}:{ENGINE_AGENT_PORT_BASE + i}"

    def describe(self) -> str:
        hosts = ", ".join(f"{n} {h.address}" for n, h in self.lab.hosts.items())
        return f"netns hosts: {hosts}; {self.n} engine agents on engines; gateways {', '.join(self.gateway_hosts)}"

    def in_host(self, host: str, purpose: str = "monitor") -> InNamespace:
        """A thread in `host`'s namespace, one per purpose (the monitor's samples do not queue the
        scenario's own checks behind them)."""
        key = f"{host}/{purpose}"
        if key not in self._in_ns:
            self._in_ns[key] = InNamespace(self.lab.hosts[host].netns)
        return self._in_ns[key]

    def envoy_clusters(self, host: str, purpose: str = "monitor") -> str:
        """Envoy's admin /clusters on `host` (loopback there), through a client kept by that thread."""
        return self.in_host(host, purpose).call(_envoy_clusters, timeout_s=3.0)

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.lab.create()
        for host in self.server_hosts:
            self.consul[host] = ConsulAgent(self.lab, host, self.server_hosts, True, self.logs).start()
        for host in ["engines", *(self.gateway_hosts if self.gateway_consul == "local" else [])]:
            self.consul[host] = ConsulAgent(self.lab, host, self.server_hosts, False, self.logs).start()
        self._wait(lambda: self.leader_host() is not None, "a Consul leader")
        members = set(self.consul)
        if self.gateway_consul == "follower":
            leader = self.leader_host()
            self.gateway_consul_server = next(h for h in self.server_hosts if h != leader)
        self._wait(lambda: self._catalog_nodes() >= members, f"every Consul agent in the catalog ({sorted(members)})")
        self.progress(f"mesh-netns: Consul up, leader {self.leader_host()}; {self.describe()}")
        token_dir = self.lab.hosts["engines"].root / "tokens"
        token_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            self.engine_agents.append(self._engine_agent(i, token_dir).start())
        for host in self.gateway_hosts:
            self.gateways[host] = self._gateway(host).start()
        if self.dns_clients:
            self._write_resolv_conf()

    def _wait(self, cond: Any, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except (httpx.HTTPError, ValueError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"mesh-netns: no {what} after {timeout_s:g}s\n{self.log_tails()}")

    def _engine_agent(self, i: int, token_dir: Path) -> ManagedProcess:
        addr = self.address("engines")
        port = ENGINE_PORT_BASE + i
        token_file = token_dir / f"control-{port}"
        ensure_secret(token_file)
        engine = self.settings.agent_engine(port, i, self.n)
        engine["host"] = addr  # the engine listens on the host's address, which gateways dial
        config = self.workdir / f"engine-agent-{i}.toml"
        config.write_text(
            tomli_w.dumps(
                {
                    "listen": f"{addr}:{ENGINE_AGENT_PORT_BASE + i}",
                    "node": "engines",
                    "log_dir": str(self.logs),
                    "control_token_file": str(token_file),
                    **self.agent_settings,
                    "consul": {"address": f"127.0.0.1:{CONSUL_HTTP_PORT}", "service": SERVICE},
                    "engines": [engine],
                }
            )
        )
        cmd = exec_in(self.lab.hosts["engines"].netns, mesh_command("engine", "--config", str(config)))
        return ManagedProcess(f"engine-agent-{i}", cmd, self.logs / f"engine-agent-{i}.log")

    def _gateway(self, host: str) -> ManagedProcess:
        root = self.lab.hosts[host].root
        config = self.workdir / f"gateway-{host}.toml"
        config.write_text(
            tomli_w.dumps(
                {
                    "name": host,
                    "run_dir": str(root / "gateway"),
                    "listen": f"0.0.0.0:{GATEWAY_PORT}",
                    "envoy_admin": ENVOY_ADMIN,
                    "xds": "127.0.0.1:18000",
                    "metrics": f"0.0.0.0:{GATEWAY_METRICS_PORT}",
                    "advertise_address": self.address(host),
                    "drain_deadline_s": 10.0,
                    "consul": {"address": self._gateway_consul_address(), "service": SERVICE},
                    "edge": {"api_keys": keys_file(root / "keys")},
                }
            )
        )
        cmd = exec_in(self.lab.hosts[host].netns, mesh_command("gateway", "--config", str(config)))
        return ManagedProcess(f"gateway-{host}", cmd, self.logs / f"gateway-{host}.log")

    def _gateway_consul_address(self) -> str:
        if self.gateway_consul == "follower":
            return f"{self.address(self.gateway_consul_server)}:{CONSUL_HTTP_PORT}"
        return f"127.0.0.1:{CONSUL_HTTP_PORT}"

    def _write_resolv_conf(self) -> None:
        """The client host's resolver: Consul's DNS on the first server (`ip netns exec` mounts
        /etc/netns/<ns>/resolv.conf over /etc/resolv.conf for what it runs)."""
        d = Path("/etc/netns") / self.lab.hosts["client"].netns
        d.mkdir(parents=True, exist_ok=True)
        (d / "resolv.conf").write_text(
            f"nameserver {self.address(self.server_hosts[0])}\noptions timeout:1 attempts:2\n"
        )
        self._resolv_dir = d

    def load_generator(self, cfg: LoadConfig) -> LoadGenerator:
        if not self.dns_clients:
            self.load = LoadGenerator(cfg)
        else:
            self.load = NamespaceLoad(
                LoadConfig(
                    f"http://{GATEWAY_NAME}:{GATEWAY_PORT}",
                    cfg.model,
                    cfg.concurrency,
                    cfg.stream_ratio,
                    cfg.max_tokens,
                    cfg.request_timeout_s,
                    max_retries=CLIENT_MAX_RETRIES,
                    connect_timeout_s=CLIENT_CONNECT_TIMEOUT_S,
                    read_timeout_s=CLIENT_READ_TIMEOUT_S,
                    max_connections=1,
                ),
                self.lab.hosts["client"].netns,
                self.workdir / "client-results.jsonl",
                self.logs / "clients.log",
            )
        return self.load

    def stop(self) -> None:
        """SIGTERM to every agent (they deregister and drain), then every process in the hosts."""
        for host in list(self.lost):
            self.lab.restore(host)
        procs = [*self.gateways.values(), *self.engine_agents]
        for p in procs:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in procs:
            if p.proc is not None:
                try:
                    p.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for ns in self._in_ns.values():
            try:
                ns.call(_close_thread_client, timeout_s=2.0)
            except Exception:  # noqa: BLE001 - the thread is busy or gone: its sockets go with the process
                pass
            ns.close()
        self.lab.cleanup()  # what is left in the namespaces (Envoy, relays, engines, Consul) is killed
        for p in [*procs, *(c.proc for c in self.consul.values() if c.proc is not None)]:
            if p.proc is not None:
                p.proc.poll()
        if self._resolv_dir is not None:
            shutil.rmtree(self._resolv_dir, ignore_errors=True)

    def log_tails(self, lines: int = 10) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path}:\n" + "\n".join(tail))
        return "\n".join(out)

    def wait_all_in_rotation(self, timeout_s: float) -> None:
        """Every gateway routes to every engine, and every gateway is passing in Consul (clients
        that resolve the gateways' name find them all)."""
        try:
            super().wait_all_in_rotation(timeout_s)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.log_tails()}") from None
        gateways = len(self.gateway_hosts)
        self._wait(
            lambda: sum(1 for v in (self.passing(GATEWAY_SERVICE) or {}).values() if v == "passing") == gateways,
            f"{gateways} gateway(s) passing in Consul",
            timeout_s,
        )

    # --- Consul -------------------------------------------------------------------------------
    def live_servers(self) -> list[str]:
        return [h for h in self.server_hosts if self.consul[h].alive() and h not in self.lost]

    def leader_host(self, ask: str | None = None) -> str | None:
        """The server the cluster names leader (asked of `ask`, or of the first live server)."""
        hosts = [ask] if ask else self.live_servers()
        for host in hosts:
            try:
                leader = self._http.get(f"{self.consul[host].url}/v1/status/leader", timeout=1.0).json()
            except (httpx.HTTPError, ValueError):
                continue
            addr = str(leader).rpartition(":")[0]
            return next((h for h in self.server_hosts if self.address(h) == addr), None)
        return None

    def _catalog_nodes(self) -> set[str]:
        host = self.live_servers()[0]
        nodes = self._http.get(f"{self.consul[host].url}/v1/catalog/nodes").json()
        return {n["Node"] for n in nodes}

    def passing(self, service: str = SERVICE) -> dict[str, str] | None:
        """id -> aggregate status of the service's instances, read `stale` from a live server (a
        follower answers without a leader); None if no server answers."""
        for host in self.live_servers():
            try:
                r = self._http.get(f"{self.consul[host].url}/v1/health/service/{service}?stale", timeout=1.0)
                entries = r.json()
            except (httpx.HTTPError, ValueError):
                continue
            out = {}
            for e in entries:
                statuses = {c["Status"] for c in e["Checks"]}
                worst = next((s for s in ("critical", "warning") if s in statuses), "passing")
                out[e["Service"]["ID"]] = worst
            return out
        return None

    PROBE_PORT = 8999  # a draining instance the leader-loss drills register (no request goes to it)

    def register_probe(self, tag: str) -> None:
        """A catalog change made through a live server: an `ernie` instance on a node of its own,
        draining (warning), at the engines' address and PROBE_PORT. The gateway lists it in Envoy's
        cluster once its catalog watch saw the change (Envoy sends it nothing: it is draining)."""
        node = f"drill-probe-{tag}"
        body = {
            "Node": node,
            "Address": self.address("engines"),
            "Service": {"ID": node, "Service": SERVICE, "Address": self.address("engines"), "Port": self.PROBE_PORT},
            "Check": {
                "Node": node,
                "CheckID": f"{node}-check",
                "Name": "drill probe",
                "Status": "warning",
                "ServiceID": node,
            },
        }
        for host in self.live_servers():
            try:
                r = self._http.put(f"{self.consul[host].url}/v1/catalog/register", json=body, timeout=5.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                continue
        raise RuntimeError("no live Consul server took the probe's registration")

    def deregister_probe(self, tag: str) -> None:
        for host in self.live_servers():
            try:
                r = self._http.put(
                    f"{self.consul[host].url}/v1/catalog/deregister", json={"Node": f"drill-probe-{tag}"}, timeout=5.0
                )
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                continue

    def gateway_lists_probe(self, host: str) -> bool:
        try:
            text = self.envoy_clusters(host, "scenario")
        except Exception:  # noqa: BLE001 - Envoy not answering: not listed
            return False
        return f"{CLUSTER}::{self.address('engines')}:{self.PROBE_PORT}::" in text

    def kill_consul(self, host: str) -> int:
        return self.consul[host].kill()

    def start_consul(self, host: str) -> None:
        self.consul[host].start()

    # --- observation --------------------------------------------------------------------------
    def routable(self, host: str) -> frozenset[int]:
        """Engines the gateway on `host` would pick for a new request (its Envoy's /clusters)."""

        try:
            text = self.envoy_clusters(host)
        except Exception:  # noqa: BLE001 - Envoy not up (yet), or the host cut off: nothing routable
            return frozenset()
        flags = {int(addr.rpartition(":")[2]): h.get("health_flags", "") for addr, h in cluster_hosts(text).items()}
        return frozenset(i for i in range(self.n) if flags.get(ENGINE_PORT_BASE + i) == "healthy")

    def in_rotation(self) -> frozenset[int]:
        """Engines every gateway still on the network would route a new request to."""
        out = frozenset(range(self.n))
        for host in self.gateway_hosts:
            if host not in self.lost:
                out &= self.routable(host)
        return out

    def control_plane_ok(self) -> bool:
        """Every Consul server runs and the cluster has a leader; every engine and every gateway
        still on the network passing in the catalog."""
        if any(not self.consul[h].alive() for h in self.server_hosts) or self.leader_host() is None:
            return False
        engines = self.passing(SERVICE) or {}
        gateways = self.passing(GATEWAY_SERVICE) or {}
        live_gateways = len(self.gateway_hosts) - len(self.lost)
        return (
            sum(1 for s in engines.values() if s == "passing") == self.n
            and sum(1 for s in gateways.values() if s == "passing") == live_gateways
        )

    def engine_pid(self, i: int) -> int | None:
        try:
            instances = self._http.get(f"{self.agent_url(i)}/instances").json()["instances"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        return next((x.get("pid") for x in instances), None)

    def gateway_metric(self, host: str, name: str) -> float | None:
        try:
            text = self._http.get(f"http://{self.address(host)}:{GATEWAY_METRICS_PORT}/metrics", timeout=1.0).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def resolve(self, name: str = GATEWAY_NAME) -> list[str] | None:
        """The addresses Consul's DNS gives the clients for `name` (None: no answer)."""
        server = self.address(self.server_hosts[0])
        try:
            out = subprocess.run(
                ["dig", f"@{server}", name, "A", "+short", "+time=1", "+tries=1"],
                capture_output=True,
                text=True,
                timeout=3,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            return None
        return sorted(line for line in out.stdout.split() if line[:1].isdigit())

    # --- faults -------------------------------------------------------------------------------
    def cut(self, host: str) -> None:
        self.lab.cut(host)
        self.lost.add(host)

    def restore(self, host: str) -> None:
        self.lab.restore(host)
        self.lost.discard(host)


_thread_http = threading.local()


def cluster_hosts(text: str, cluster: str = CLUSTER) -> dict[str, dict[str, str]]:
    """Envoy's admin /clusters text -> each host (ip:port) of `cluster` -> its stats and flags
    (health_flags, rq_total, ...). The cluster's own lines (default_priority::..., outlier::...)
    are left out: their first part is not an address."""
    out: dict[str, dict[str, str]] = {}
    prefix = f"{cluster}::"
    for line in text.splitlines():
        if line.startswith(prefix):
            parts = line[len(prefix) :].split("::")
            if len(parts) == 3 and parts[0].rpartition(":")[2].isdigit():
                out.setdefault(parts[0], {})[parts[1]] = parts[2]
    return out


def _envoy_clusters() -> str:
    """Run on an InNamespace thread: its own keep-alive client (created, so connecting, there)."""
    client = getattr(_thread_http, "client", None)
    if client is None:
        client = _thread_http.client = httpx.Client(timeout=1.0)
    return str(client.get(f"http://{ENVOY_ADMIN}/clusters").text)


def _close_thread_client() -> None:
    client = getattr(_thread_http, "client", None)
    if client is not None:
        client.close()
        _thread_http.client = None


class NamespaceLoad(LoadGenerator):
    """The load of bench.load run as a process inside another host's namespace (its own resolver);
    its results are read back from the JSON lines it writes."""

    def __init__(self, cfg: LoadConfig, netns: str, out: Path, log: Path):
        super().__init__(cfg)
        self.out = out
        self._read = 0
        self._results: list[Result] = []
        cmd = [
            "-m",
            "bench.load",
            "--base-url",
            cfg.base_url,
            "--model",
            cfg.model,
            "--out",
            str(out),
            "--concurrency",
            str(cfg.concurrency),
            "--stream-ratio",
            str(cfg.stream_ratio),
            "--max-tokens",
            str(cfg.max_tokens),
            "--request-timeout",
            str(cfg.request_timeout_s),
            "--max-retries",
            str(cfg.max_retries),
            "--connect-timeout",
            str(cfg.connect_timeout_s),
            "--max-connections",
            str(cfg.max_connections),
        ]
        if cfg.read_timeout_s is not None:
            cmd += ["--read-timeout", str(cfg.read_timeout_s)]
        import sys

        self.proc = ManagedProcess("clients", exec_in(netns, [sys.executable, *cmd]), log)

    def start(self) -> NamespaceLoad:
        self.out.unlink(missing_ok=True)
        self.proc.start()
        deadline = time.monotonic() + 30
        while self.started_at is None:
            self._poll()
            if time.monotonic() > deadline or not self.proc.alive():
                raise RuntimeError(f"the clients did not start: {self.proc.log_tail(20)}")
            time.sleep(0.1)
        return self

    def _poll(self) -> None:
        try:
            with open(self.out) as f:
                f.seek(self._read)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind("\n")
        if end < 0:
            return
        self._read += len(chunk[: end + 1].encode())
        for line in chunk[: end + 1].splitlines():
            d = json.loads(line)
            if "started_at" in d:
                self.started_at = d["started_at"]
            elif "stopped_at" in d:
                self.stopped_at = d["stopped_at"]
            else:
                self._results.append(Result(**d))

    def stop(self, wait_s: float | None = None) -> None:
        if self.proc.alive():
            self.proc.signal(signal.SIGTERM)
            try:
                self.proc.wait(self.cfg.request_timeout_s + 10 if wait_s is None else max(wait_s, 0.5))
            except subprocess.TimeoutExpired:
                self.proc.kill_group()
        self._poll()
        if self.stopped_at is None:
            self.stopped_at = time.time()

    def snapshot(self) -> list[Result]:
        with self._lock:
            self._poll()
            return list(self._results)
