"""A real `consul agent -dev` on loopback with its own ports and data dir (for `up` and tests)."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from agent.local.binaries import consul_binary
from agent.local.ports import free_ports

START_TIMEOUT_S = 30.0


@dataclass
class ConsulDev:
    http_port: int = 0
    dns_port: int = 0
    node: str = "ernie-dev"
    data_dir: str | None = None
    log_path: str | None = None
    config_file: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> ConsulDev:
        ports = free_ports(6)
        if not self.http_port:
            self.http_port = ports[0]
        if not self.dns_port:
            self.dns_port = ports[1]
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="ernie-consul-")
        serf_lan, serf_wan, server = ports[2], ports[3], ports[4]
        hcl = Path(self.data_dir) / "ports.json"
        hcl.write_text(
            json.dumps(
                {
                    "ports": {"grpc": -1, "serf_lan": serf_lan, "serf_wan": serf_wan, "server": server},
                    "dns_config": {"only_passing": True},
                    "check_update_interval": "0s",
                }
            )
        )
        cmd = [
            consul_binary(),
            "agent",
            "-dev",
            "-bind=127.0.0.1",
            "-client=127.0.0.1",
            f"-http-port={self.http_port}",
            f"-dns-port={self.dns_port}",
            f"-node={self.node}",
            f"-config-file={hcl}",
        ]
        if self.config_file:
            cmd.append(f"-config-file={self.config_file}")
        log_path = self.log_path or str(Path(self.data_dir) / "consul.log")
        self.log_path = log_path
        log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"consul exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/status/leader", timeout=1) as r:
                    if json.loads(r.read() or b'""'):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"consul at {self.url} had no leader after {timeout_s}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop and start on the same ports; -dev keeps nothing, like a Consul that lost its state."""
        self.stop()
        self.start()

    def __enter__(self) -> ConsulDev:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
