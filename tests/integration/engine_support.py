"""Start real engine agents (supervising simulated engines) against a real Consul."""

from __future__ import annotations

from pathlib import Path

import httpx
import tomli_w

from agent.catalog.base import CatalogEntry
from agent.catalog.consul import ConsulCatalog
from agent.local.ports import free_port
from agent.local.procs import ManagedProcess, mesh_command
from agent.local.wait import wait_until
from agent.naming import instance_id
from agent.secret_files import ensure_secret


class EngineAgent:
    """`ernie-mesh engine` as a subprocess with a generated engine.toml."""

    def __init__(
        self,
        tmp: Path,
        consul_address: str,
        service: str,
        engines: list[dict],
        node: str = "it",
        env: dict[str, str] | None = None,
        **settings,
    ):
        self.tmp = Path(tmp)
        self.service = service
        self.node = node
        self.port = free_port()
        self.catalog = ConsulCatalog(consul_address)
        self.config_path = self.tmp / f"engine-{self.port}.toml"
        # POST /drain needs the control token (settings may name another file, or "" for none)
        self.token_file = str(self.tmp / f"control-token-{self.port}")
        self.token = ensure_secret(Path(self.token_file))
        settings.setdefault("control_token_file", self.token_file)
        self.config_path.write_text(
            tomli_w.dumps(
                {
                    "listen": f"127.0.0.1:{self.port}",
                    "node": node,
                    "advertise_address": "127.0.0.1",  # a one-host mesh: loopback registered on purpose
                    "log_dir": str(self.tmp / "logs"),
                    **settings,
                    "consul": {"address": consul_address, "service": service},
                    "engines": engines,
                }
            )
        )
        self.proc = ManagedProcess(
            f"engine-agent-{self.port}",
            mesh_command("engine", "--config", str(self.config_path)),
            self.tmp / f"engine-agent-{self.port}.log",
            env=env,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def instance_id(self, engine_port: int) -> str:
        return instance_id(self.service, self.node, "127.0.0.1", engine_port)  # engines on loopback here

    def start(self) -> EngineAgent:
        self.proc.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> int | None:
        return self.proc.stop(timeout_s)

    def drain(self, instance_id: str, token: str | None = None) -> httpx.Response:
        """POST /drain/<id> with the control token (or `token`)."""
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        return httpx.post(f"{self.url}/drain/{instance_id}", headers=headers, timeout=10)

    def instances(self) -> dict:
        return {i["id"]: i for i in httpx.get(f"{self.url}/instances", timeout=5).json()["instances"]}

    def entries(self) -> dict[str, CatalogEntry]:
        _idx, entries = self.catalog.instances(self.service)
        return {e.instance_id: e for e in entries}

    def wait_state(self, instance_id: str, state: str, timeout_s: float, cause: str = "") -> CatalogEntry:
        """Poll Consul until the instance's verdict has `state` (and, if given, `cause`)."""

        def ok():
            e = self.entries().get(instance_id)
            v = e.verdict if e else None
            return e if v and v.state.value == state and (not cause or (v.cause and v.cause.value == cause)) else None

        try:
            return wait_until(ok, timeout_s, what=f"{instance_id} {state} ({cause or 'any cause'}) in Consul")
        except TimeoutError as err:
            raise AssertionError(
                f"{err}; now: {self.entries().get(instance_id)}\n--- agent log ---\n{self.proc.log_tail()}"
            ) from None

    def __enter__(self) -> EngineAgent:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def set_sim_fault(engine_url: str, mode: str, **params) -> None:
    r = httpx.post(f"{engine_url}/sim/fault", json={"mode": mode, **params}, timeout=5)
    r.raise_for_status()
