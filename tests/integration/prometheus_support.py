"""A real Prometheus (a build with Consul SD) for the observability tests: install, run, query.

Also a gateway agent subprocess and a little load, so every series the dashboard and the rules
read exists. Everything listens on loopback; everything started here is stopped by its owner.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import httpx
import pytest

from agent.local.ports import free_ports
from agent.local.procs import ManagedProcess, mesh_command
from agent.local.prometheus import find_prometheus, prometheus_command, write_config
from agent.local.wait import wait_until
from tests.integration.gateway_support import AUTH, TEST_KEYS_FILE_TEXT

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "deploy" / "prometheus" / "install.sh"
DASHBOARD = REPO / "deploy" / "grafana" / "ernie-mesh.json"
INSTALL_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 5.0


def prometheus_binaries() -> tuple[str, str]:
    """(prometheus, promtool) with Consul SD; installs Debian bullseye's build into the venv if needed
    (the test set-up of issue 5: Debian's bookworm/trixie builds have Consul SD disabled)."""
    found = find_prometheus()
    if found is None:
        r = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        found = find_prometheus()
        if found is None:
            pytest.fail(
                f"no Prometheus with Consul SD, and {INSTALL_SCRIPT} could not install one "
                f"(exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            )
    return found


def promtool(promtool_path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool_path, *args], capture_output=True, text=True, timeout=60)


class Prometheus:
    """`prometheus` on a free loopback port with its own config (rendered for this Consul), rules and data."""

    def __init__(self, tmp: Path, consul_address: str, *, interval_s: float = 1.0, alert_for_s: float | None = None):
        self.tmp = Path(tmp)
        self.binary, self.promtool = prometheus_binaries()
        self.port = free_ports(1)[0]
        self.config_path = write_config(
            self.tmp / "config",
            consul_address,
            scrape_interval_s=interval_s,
            evaluation_interval_s=interval_s,
            sd_refresh_interval_s=interval_s,
            alert_for_s=alert_for_s,
        )
        self.proc = ManagedProcess(
            "prometheus",
            prometheus_command(
                self.binary, self.config_path, self.tmp / "data", f"127.0.0.1:{self.port}", retention="1h"
            ),
            self.tmp / "prometheus.log",
        )
        self.client = httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT_S)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        self.proc.start()

        def ready() -> bool:
            if not self.proc.alive():
                raise AssertionError(f"prometheus exited:\n{self.proc.log_tail()}")
            return self.client.get("/-/ready").status_code == 200

        wait_until(ready, READY_TIMEOUT_S, what="Prometheus ready")
        return self

    def stop(self) -> None:
        self.client.close()
        self.proc.stop(10.0)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- HTTP API ---------------------------------------------------------------------------------

    def api(self, path: str, **params):
        r = self.client.get(f"/api/v1/{path}", params=params)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"/api/v1/{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def targets(self) -> list[dict]:
        return self.api("targets", state="active")["activeTargets"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def rules(self) -> list[dict]:
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]


def finite_values(result: list[dict]) -> list[float]:
    return [float(s["value"][1]) for s in result if math.isfinite(float(s["value"][1]))]


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel (rows included) in a Grafana dashboard JSON."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", ""), t["expr"]))
            walk(p.get("panels", []))

    walk(json.loads(path.read_text())["panels"])
    return out


class GatewayAgent:
    """`ernie-mesh gateway` (which starts and supervises its Envoy) on free loopback ports."""

    def __init__(self, tmp: Path, consul_address: str, service: str, name: str):
        self.tmp = Path(tmp)
        self.name = name
        self.listen_port, self.admin_port, self.xds_port, self.metrics_port = free_ports(4)
        keys_file = self.tmp / f"gateway-{name}-api-keys.toml"
        keys_file.write_text(TEST_KEYS_FILE_TEXT)
        self.proc = ManagedProcess(
            f"gateway-{name}",
            mesh_command(
                "gateway",
                "--name",
                name,
                "--consul",
                consul_address,
                "--service",
                service,
                "--listen",
                f"127.0.0.1:{self.listen_port}",
                "--envoy-admin",
                f"127.0.0.1:{self.admin_port}",
                "--xds",
                f"127.0.0.1:{self.xds_port}",
                "--metrics",
                f"127.0.0.1:{self.metrics_port}",
                "--run-dir",
                str(self.tmp / f"gateway-{name}"),
                "--envoy-concurrency",
                "1",
                "--api-keys",
                str(keys_file),
            ),
            self.tmp / f"gateway-{name}.log",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=HTTP_TIMEOUT_S).text
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == name:
                return float(value)
        return 0.0

    def start(self, healthy_endpoints: int, timeout_s: float = 60.0) -> GatewayAgent:
        self.proc.start()

        def ready() -> bool:
            if not self.proc.alive():
                raise AssertionError(f"gateway exited:\n{self.proc.log_tail()}")
            return (
                self.metric("ernie_gateway_xds_streams") >= 1
                and self.metric('ernie_gateway_endpoints{state="healthy"}') >= healthy_endpoints
            )

        try:
            wait_until(ready, timeout_s, what=f"gateway {self.name} serving {healthy_endpoints} healthy endpoints")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n--- gateway log ---\n{self.proc.log_tail()}") from None
        return self

    def stop(self) -> None:
        self.proc.stop(30.0)


def chat(base_url: str, max_tokens: int = 6) -> httpx.Response:
    """One streamed chat completion read to the end (so TTFT, inter-token and e2e latencies are observed)."""
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30.0, headers=AUTH) as r:
        r.read()
        return r
