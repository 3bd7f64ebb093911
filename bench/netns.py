"""Test hosts as Linux network namespaces: a bridge, one veth pair and one address per host.

A `NetnsLab` creates, on this machine only:
  - a bridge `<tag>br` with the address <subnet>.1/24 (the root namespace reaches the hosts through it);
  - per host a namespace `<tag>-<name>` with `lo` up and `eth0` = <subnet>.<n>/24, its peer on the bridge.
The namespaces get no default route: traffic never leaves the lab's subnet. Ansible reaches the hosts
with the `netns` connection plugin (deploy/ansible/connection_plugins/netns.py), and each host gets
its own root directory for files. `cleanup()` kills every process inside the namespaces, deletes
them and the bridge; stale labs of dead test runs are removed when a new lab starts.
Needs root and iproute2. Used by the netns integration tests and the netns drills (bench/netns_mesh.py);
`in_namespace` runs Python calls (HTTP to a host's loopback-only ports) from a thread inside a host.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

PREFIX = "ernt"  # every namespace/bridge/veth of these labs starts with it
SUBNET_CANDIDATES = [f"10.231.{i}" for i in range(0, 32)]
KILL_WAIT_S = 10.0
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def available() -> str:
    """'' when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if not shutil.which("ip"):
        return "needs iproute2 (ip)"
    probe = f"{PREFIX}probe{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_namespace_processes(ns: str) -> None:
    pids = ns_pids(ns)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (KILL_WAIT_S if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline and ns_pids(ns):
            time.sleep(0.1)
        pids = ns_pids(ns)
        if not pids:
            return


def _destroy(namespaces: list[str], bridge: str | None) -> None:
    for ns in namespaces:
        _kill_namespace_processes(ns)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if bridge:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def remove_stale_labs() -> None:
    """Labs whose creating process is gone (a killed test run): namespaces and bridges named ernt<pid>..."""
    owners: dict[int, list[str]] = {}
    for ns in _namespaces():
        m = re.match(rf"^{PREFIX}(\d+)-", ns)
        if m:
            owners.setdefault(int(m.group(1)), []).append(ns)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    bridges = {int(m.group(1)): m.group(0) for m in re.finditer(rf"\b{PREFIX}(\d+)br\b", links)}
    for pid in set(owners) | set(bridges):
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            _destroy(owners.get(pid, []), bridges.get(pid))


@dataclass(frozen=True)
class Host:
    name: str  # inventory name
    netns: str  # network namespace
    address: str  # eth0 address inside the namespace
    veth: str  # the host's veth on the bridge (root namespace): cut it to partition the host
    root: Path  # the host's own root directory (ernie_root)


class NetnsLab:
    def __init__(self, base_dir: Path, names: list[str]):
        self.tag = f"{PREFIX}{os.getpid()}"
        self.base_dir = Path(base_dir)
        self.names = names
        self.bridge = f"{self.tag}br"
        self.subnet = ""
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []
        self._bridge_made = False
        if len(self.bridge) > 15:
            raise RuntimeError(f"interface name {self.bridge} too long")

    @property
    def gateway_address(self) -> str:
        """The bridge's address in the root namespace (the test's own client address)."""
        return f"{self.subnet}.1"

    def _free_subnet(self) -> str:
        routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
        addrs = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
        used = routes + addrs
        for prefix in SUBNET_CANDIDATES:
            net = ipaddress.ip_network(f"{prefix}.0/24")
            if not any(ipaddress.ip_address(a) in net for a in re.findall(r"\b(\d+\.\d+\.\d+\.\d+)\b", used)):
                return prefix
        raise RuntimeError("no free 10.231.x.0/24 subnet for the test hosts")

    def create(self) -> NetnsLab:
        remove_stale_labs()
        self.subnet = self._free_subnet()
        ip("link", "add", self.bridge, "type", "bridge")
        self._bridge_made = True
        ip("addr", "add", f"{self.gateway_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, name in enumerate(self.names):
            ns = f"{self.tag}-{name}"
            veth = f"{self.tag}v{i}"
            if len(veth) > 15:
                raise RuntimeError(f"interface name {veth} too long")
            address = f"{self.subnet}.{11 + i}"
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            self._made.append(ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", veth, "master", self.bridge)
            ip("link", "set", veth, "up")
            ip("link", "set", "lo", "up", ns=ns)
            ip("addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
            ip("link", "set", "eth0", "up", ns=ns)
            root = self.base_dir / "hosts" / name
            root.mkdir(parents=True, exist_ok=True)
            self.hosts[name] = Host(name, ns, address, veth, root)
        return self

    def run(self, name: str, *cmd: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.hosts[name].netns, *cmd], capture_output=True, text=True, timeout=timeout_s
        )

    def cut(self, name: str) -> None:
        """Cut the host's link (its veth on the bridge goes down): a host lost to the network."""
        ip("link", "set", self.hosts[name].veth, "down")

    def restore(self, name: str) -> None:
        ip("link", "set", self.hosts[name].veth, "up")

    def processes(self) -> dict[str, list[int]]:
        return {name: ns_pids(h.netns) for name, h in self.hosts.items()}

    def cleanup(self) -> None:
        _destroy(list(reversed(self._made)), self.bridge if self._bridge_made else None)
        # A namespace outlives `ip netns del` while anything still holds it (a socket, a thread of
        # this process that entered it): delete the veth pairs here, so the names are free at once.
        for host in self.hosts.values():
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
        self._made.clear()
        self._bridge_made = False

    def __enter__(self) -> NetnsLab:
        try:
            return self.create()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def exec_in(ns: str, cmd: list[str]) -> list[str]:
    """`cmd` run inside namespace `ns` (`ip netns exec` execs it: the pid is the command's own, and
    /etc/netns/<ns>/resolv.conf, if there is one, is the command's /etc/resolv.conf)."""
    return ["ip", "netns", "exec", ns, *cmd]


def _enter(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


class InNamespace:
    """One thread that lives in a host's network namespace (setns(2) moves the calling thread only):
    calls submitted here open their sockets there, e.g. to Envoy's loopback-only admin API."""

    def __init__(self, ns: str):
        self.ns = ns
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"netns-{ns}", initializer=_enter, initargs=(ns,)
        )

    def call(self, fn: Callable[[], T], timeout_s: float = 10.0) -> T:
        return self._pool.submit(fn).result(timeout=timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
