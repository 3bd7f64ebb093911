"""Two Consul datacenters, WAN-joined, on network namespaces (bench/netns.py): the lab of the
multi-datacenter failover test (tests/integration/test_multidc_netns.py).

Hosts (one namespace each, one bridge; the test runs in the root namespace):
  c1, c2     the Consul server of dc1 and of dc2 (`bootstrap_expect` 1 each, `retry_join_wan` the other)
  e1, e2     a Consul client of dc1 / dc2 and one engine agent per simulated engine
  gw         a Consul client of dc1 and the gateway (`[locality] datacenters = ["dc2"]`)

Every agent talks to its host's local Consul client on 127.0.0.1:8500 (as deployed); the gateway's
dc2 instances come through its local agent and dc1's server (`?dc=dc2`, WAN federation). A WAN
partition is a blackhole route on every host of each datacenter to every host of the other (each
datacenter keeps its own network; the test's root namespace still reaches everyone). Consul's
settings are bench/netns_mesh.py's (no ACLs, TLS or gossip encryption: the Ansible inventory's
two-datacenter settings are checked by rendering, tests/unit/test_ansible_multidc.py). Needs root
and iproute2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from agent.local.procs import ManagedProcess, mesh_command
from agent.secret_files import ensure_secret
from bench.engines import EngineSettings
from bench.keys import keys_file
from bench.netns import InNamespace, NetnsLab, available, exec_in, ip
from bench.netns_mesh import (
    CONSUL_HTTP_PORT,
    ENVOY_ADMIN,
    ConsulAgent,
    _close_thread_client,
    _envoy_clusters,
    cluster_hosts,
)

SERVICE = "ernie"
CLUSTER = "ernie"
DATACENTERS = ("dc1", "dc2")
SERVER_OF = {"dc1": "c1", "dc2": "c2"}
ENGINES_OF = {"dc1": "e1", "dc2": "e2"}
GATEWAY_HOST = "gw"
GATEWAY_PORT = 8080
GATEWAY_METRICS_PORT = 9102
ENGINE_PORT_BASE = 8001
ENGINE_AGENT_PORT_BASE = 9101
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
# The engine agents' TTL: short, so that a killed agent's instances turn critical in Consul (for
# the prepared query's failover) within the test; the gateway has left them long before.
ENGINE_TTL_S = 3.0
ENGINE_TTL_REFRESH_S = 1.0


def dc_of_host(host: str) -> str:
    return "dc2" if host in ("c2", "e2") else "dc1"


class TwoDatacenters:
    def __init__(
        self,
        settings: EngineSettings,
        engines_per_dc: int,
        workdir: Path,
        progress: Callable[[str], None] = print,
        locality: dict[str, Any] | None = None,
    ):
        if settings.kind != "sim":
            raise ValueError("the netns two-datacenter lab runs simulated engines")
        why = available()
        if why:
            raise RuntimeError(f"the two-datacenter lab needs network namespaces: {why}")
        self.settings = settings
        self.per_dc = engines_per_dc
        self.workdir = Path(workdir)
        self.progress = progress
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.lab = NetnsLab(self.workdir, ["c1", "c2", "e1", "e2", GATEWAY_HOST])
        self.locality = {"datacenters": ["dc2"], **(locality or {})}
        self.consul: dict[str, ConsulAgent] = {}
        self.engine_agents: dict[str, list[ManagedProcess]] = {dc: [] for dc in DATACENTERS}
        self.gateway: ManagedProcess | None = None
        self.partitioned = False
        self._http = httpx.Client(timeout=2.0)
        self._gw_ns: InNamespace | None = None

    # --- addresses ----------------------------------------------------------------------------
    def address(self, host: str) -> str:
        return self.lab.hosts[host].address

    @property
    def base_url(self) -> str:
        return f"http://{self.address(GATEWAY_HOST)}:{GATEWAY_PORT}"

    def consul_url(self, dc: str) -> str:
        return f"http://{self.address(SERVER_OF[dc])}:{CONSUL_HTTP_PORT}"

    def engine_address(self, dc: str, i: int) -> str:
        return f"{self.address(ENGINES_OF[dc])}:{ENGINE_PORT_BASE + i}"

    def dc_of_address(self, address: str) -> str:
        """ "dc1"/"dc2" of an engine's ip:port (or ip)."""
        ip_ = address.rpartition(":")[0] or address
        return next((dc for dc, host in ENGINES_OF.items() if self.address(host) == ip_), "")

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.lab.create()
        for dc in DATACENTERS:
            other = SERVER_OF["dc2" if dc == "dc1" else "dc1"]
            server = SERVER_OF[dc]
            self.consul[server] = ConsulAgent(
                self.lab, server, [server], True, self.logs, datacenter=dc, wan_join=(other,)
            ).start()
        for host, dc in (("e1", "dc1"), ("e2", "dc2"), (GATEWAY_HOST, "dc1")):
            self.consul[host] = ConsulAgent(self.lab, host, [SERVER_OF[dc]], False, self.logs, datacenter=dc).start()
        for dc in DATACENTERS:
            self._wait(partial(self._leader, dc), f"a Consul leader in {dc}")
        self._wait(self._wan_joined, "the two servers WAN-joined, each datacenter known to the other")
        for dc in DATACENTERS:
            self._wait(partial(self._all_nodes, dc), f"every Consul agent of {dc} in its catalog")
        self.progress(f"two datacenters up: {', '.join(f'{n} {h.address}' for n, h in self.lab.hosts.items())}")
        for dc in DATACENTERS:
            self.start_engines(dc)
        self.gateway = self._gateway().start()

    def _wait(self, cond: Callable[[], object], what: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except (httpx.HTTPError, ValueError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"two datacenters: no {what} after {timeout_s:g}s\n{self.log_tails()}")

    def _leader(self, dc: str) -> bool:
        return bool(self._http.get(f"{self.consul_url(dc)}/v1/status/leader", timeout=1.0).json())

    def _wan_joined(self) -> bool:
        for dc in DATACENTERS:
            known = self._http.get(f"{self.consul_url(dc)}/v1/catalog/datacenters", timeout=1.0).json()
            if set(known) != set(DATACENTERS):
                return False
        return True

    def _all_nodes(self, dc: str) -> bool:
        nodes = {n["Node"] for n in self._http.get(f"{self.consul_url(dc)}/v1/catalog/nodes", timeout=1.0).json()}
        return nodes >= {h for h in self.lab.hosts if dc_of_host(h) == dc}

    def start_engines(self, dc: str) -> None:
        """The datacenter's engine agents (each starts its simulated engine and registers it)."""
        host = ENGINES_OF[dc]
        self.engine_agents[dc] = [self._engine_agent(dc, i).start() for i in range(self.per_dc)]
        self.progress(f"{dc}: {self.per_dc} engine agents started on {host}")

    def _engine_agent(self, dc: str, i: int) -> ManagedProcess:
        host = ENGINES_OF[dc]
        addr = self.address(host)
        port = ENGINE_PORT_BASE + i
        token_file = self.lab.hosts[host].root / "tokens" / f"control-{port}"
        token_file.parent.mkdir(parents=True, exist_ok=True)
        ensure_secret(token_file)
        engine = self.settings.agent_engine(port, i, self.per_dc)
        engine["host"] = addr
        config = self.workdir / f"engine-agent-{dc}-{i}.toml"
        config.write_text(
            tomli_w.dumps(
                {
                    "listen": f"{addr}:{ENGINE_AGENT_PORT_BASE + i}",
                    "node": host,
                    "zone": f"{dc}-a",
                    "log_dir": str(self.logs),
                    "control_token_file": str(token_file),
                    "ttl_s": ENGINE_TTL_S,
                    "ttl_refresh_s": ENGINE_TTL_REFRESH_S,
                    "consul": {"address": f"127.0.0.1:{CONSUL_HTTP_PORT}", "service": SERVICE},
                    "engines": [engine],
                }
            )
        )
        cmd = exec_in(self.lab.hosts[host].netns, mesh_command("engine", "--config", str(config)))
        return ManagedProcess(f"engine-agent-{dc}-{i}", cmd, self.logs / f"engine-agent-{dc}-{i}.log")

    def kill_engines(self, dc: str) -> None:
        """SIGKILL every engine of `dc` and its engine agent (the agents' TTLs then expire in Consul)."""
        host = ENGINES_OF[dc]
        engine_pids = [self._engine_pid(host, i) for i in range(self.per_dc)]
        for pid in engine_pids:
            if pid:
                os.kill(pid, signal.SIGKILL)
        for agent in self.engine_agents[dc]:
            agent.kill_group()
        for agent in self.engine_agents[dc]:
            if agent.proc is not None:
                agent.proc.wait(STOP_TIMEOUT_S)

    def _engine_pid(self, host: str, i: int) -> int | None:
        url = f"http://{self.address(host)}:{ENGINE_AGENT_PORT_BASE + i}/instances"
        try:
            instances = self._http.get(url).json()["instances"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        pid = next((x.get("pid") for x in instances), None)
        return int(pid) if isinstance(pid, int) else None

    def _gateway(self) -> ManagedProcess:
        root = self.lab.hosts[GATEWAY_HOST].root
        config = self.workdir / "gateway.toml"
        config.write_text(
            tomli_w.dumps(
                {
                    "name": GATEWAY_HOST,
                    "run_dir": str(root / "gateway"),
                    "listen": f"0.0.0.0:{GATEWAY_PORT}",
                    "envoy_admin": ENVOY_ADMIN,
                    "xds": "127.0.0.1:18000",
                    "metrics": f"0.0.0.0:{GATEWAY_METRICS_PORT}",
                    "advertise_address": self.address(GATEWAY_HOST),
                    "drain_deadline_s": 10.0,
                    "consul": {"address": f"127.0.0.1:{CONSUL_HTTP_PORT}", "service": SERVICE},
                    "edge": {"api_keys": keys_file(root / "keys")},
                    "locality": self.locality,
                }
            )
        )
        cmd = exec_in(self.lab.hosts[GATEWAY_HOST].netns, mesh_command("gateway", "--config", str(config)))
        return ManagedProcess("gateway", cmd, self.logs / "gateway.log")

    def stop(self) -> None:
        if self.partitioned:
            self.heal()
        # Nothing is measured at the end: the agents are killed, not drained (CI time); what they
        # started in the namespaces (Envoy, relays, engines, Consul) goes with the lab.
        procs = [p for p in [self.gateway, *self.engine_agents["dc1"], *self.engine_agents["dc2"]] if p is not None]
        for p in procs:
            if p.proc is not None:
                p.kill_group()
                try:
                    p.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pass
        if self._gw_ns is not None:
            try:
                self._gw_ns.call(_close_thread_client, timeout_s=2.0)
            except Exception:  # noqa: BLE001 - busy or gone: its sockets go with the process
                pass
            self._gw_ns.close()
        for agent in self.consul.values():
            if agent.alive():
                agent.kill()
        self.lab.cleanup()  # what is left in the namespaces (Envoy, relays, engines) is killed
        for p in [*procs, *(c.proc for c in self.consul.values() if c.proc is not None)]:
            if p.proc is not None:
                p.proc.poll()

    def log_tails(self, lines: int = 12) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path}:\n" + "\n".join(tail))
        return "\n".join(out)

    # --- the WAN ------------------------------------------------------------------------------
    def _routes(self, action: str) -> None:
        sides = {dc: [h for h in self.lab.hosts if dc_of_host(h) == dc] for dc in DATACENTERS}
        for dc, hosts in sides.items():
            others = sides["dc2" if dc == "dc1" else "dc1"]
            for host in hosts:
                for other in others:
                    ip("route", action, "blackhole", f"{self.address(other)}/32", ns=self.lab.hosts[host].netns)

    def partition(self) -> None:
        """Cut the WAN: no host of one datacenter reaches a host of the other."""
        self._routes("add")
        self.partitioned = True

    def heal(self) -> None:
        self._routes("del")
        self.partitioned = False

    # --- observation --------------------------------------------------------------------------
    def envoy_hosts(self) -> dict[str, tuple[str, int]]:
        """The gateway's Envoy: engine ip:port -> (health_flags, rq_total)."""
        if self._gw_ns is None:
            self._gw_ns = InNamespace(self.lab.hosts[GATEWAY_HOST].netns)
        text = self._gw_ns.call(_envoy_clusters, timeout_s=3.0)
        return {
            addr: (h.get("health_flags", ""), int(h.get("rq_total", "0") or 0))
            for addr, h in cluster_hosts(text, CLUSTER).items()
            if "health_flags" in h
        }

    def routable(self) -> dict[str, set[str]]:
        """dc -> the engines (ip:port) the gateway's Envoy would route a new request to."""
        out: dict[str, set[str]] = {dc: set() for dc in DATACENTERS}
        for addr, (flags, _) in self.envoy_hosts().items():
            if flags == "healthy" and self.dc_of_address(addr):
                out[self.dc_of_address(addr)].add(addr)
        return out

    def requests_by_dc(self) -> dict[str, int]:
        """dc -> requests (Envoy's rq_total) its engines got from the gateway so far."""
        out = dict.fromkeys(DATACENTERS, 0)
        for addr, (_flags, total) in self.envoy_hosts().items():
            dc = self.dc_of_address(addr)
            if dc:
                out[dc] += total
        return out

    def passing(self, dc: str) -> set[str]:
        """Engine addresses (ip:port) passing in `dc`'s catalog."""
        entries = self._http.get(f"{self.consul_url(dc)}/v1/health/service/{SERVICE}?passing&stale").json()
        return {f"{e['Service']['Address']}:{e['Service']['Port']}" for e in entries}

    def put_prepared_query(self, dc: str, body: dict[str, Any]) -> str:
        r = self._http.post(f"{self.consul_url(dc)}/v1/query", json=body)
        r.raise_for_status()
        return str(r.json()["ID"])

    def dig(self, name: str, dc: str = "dc1", rtype: str = "SRV") -> list[str]:
        """Consul's DNS answer for `name` from `dc`'s server: "address:port" per SRV record."""
        out = subprocess.run(
            ["dig", f"@{self.address(SERVER_OF[dc])}", name, rtype, "+time=2", "+tries=1"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode != 0:
            return []
        records = [line.split() for line in out.stdout.splitlines() if line and not line.startswith(";")]
        srv = [(r[-1].rstrip("."), r[-2]) for r in records if len(r) >= 8 and r[3] == "SRV"]
        a = {r[0].rstrip("."): r[-1] for r in records if len(r) >= 5 and r[3] == "A"}
        return sorted(f"{a.get(target, target)}:{port}" for target, port in srv)

    def gateway_log(self) -> str:
        return (self.logs / "gateway.log").read_text(errors="replace")
