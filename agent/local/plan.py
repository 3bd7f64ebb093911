"""What `ernie-mesh up` runs and where: a pure, frozen plan (ports, URLs, generated configs).

Every port is a default shifted by `port_offset`, so a second mesh (a test, a demo next to a
developer's running mesh) can run beside the first with one flag.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from agent.local.consul_acl import LocalAcl
from agent.builtin_models import BuiltinModel, builtin
from agent.config import ConfigError, short_hostname
from agent.dashboard.config import DEFAULT_PORT as DASHBOARD_PORT
from agent.local.defaults import DEFAULT_SERVED_MODEL_NAME, vllm_engine
from agent.local.placement import Placement
from agent.naming import instance_id

REPO_DIR = Path(__file__).resolve().parents[2]
ENGINE_KINDS = ("vllm", "simulated")
SIMULATED_MODEL_NAME = "simulated"
MAX_ENGINES = 64

# Default ports (before the offset). Engines take ENGINE_PORT_BASE + 1.., their agents AGENT_PORT_BASE + 1..
UI_PORT = 8000
ENGINE_PORT_BASE = 8000
GATEWAY_PORT = 8080
CONSUL_HTTP_PORT = 8500
CONSUL_DNS_PORT = 8600
CONSUL_SERVER_PORT = 8300
CONSUL_SERF_LAN_PORT = 8301
CONSUL_SERF_WAN_PORT = 8302
PROMETHEUS_PORT = 9090
# DASHBOARD_PORT = 8090 (agent/dashboard/config.py, the dashboard's own default)
GATEWAY_METRICS_PORT = 9102
AGENT_PORT_BASE = 9200
ENVOY_ADMIN_PORT = 9901
XDS_PORT = 18000
MAX_PORT_OFFSET = 65535 - XDS_PORT

# Local mesh timings: a drain on this machine never needs the production deadline.
DRAIN_DEADLINE_S = 120.0
# The API key `up` creates (Consul KV) and keeps in run_dir/api-key; the UI uses it.
LOCAL_KEY_NAME = "local"
# The gateway stops after the engines have drained: its Envoy has little left to finish.
GATEWAY_DRAIN_DEADLINE_S = 20.0
# vLLM's --shutdown-timeout: the agent stops an engine only once it is drained to zero, so this is a
# safety net for stragglers; vLLM waits about this long even when idle (docs/vllm-cpu.md Q5).
ENGINE_SHUTDOWN_TIMEOUT_S = 5.0


def default_run_dir() -> Path:
    env = os.environ.get("ERNIE_MESH_RUN_DIR")
    return Path(env).expanduser().resolve() if env else REPO_DIR / ".run"


def default_ui_venv() -> Path:
    env = os.environ.get("VENV_UI")
    return Path(env).expanduser() if env else REPO_DIR / ".venv-ui"


def local_node_name() -> str:
    """This host's short name (agent/config.py's `short_hostname`), kept to letters, digits, '-' and '_'
    and 40 characters: the local mesh's Consul node name, part of every instance id."""
    name = short_hostname("local")
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "local"


@dataclass(frozen=True)
class MeshPlan:
    engines: int = 2
    engine_kind: str = "vllm"
    model: str = ""  # "" = the embedded default model; a built-in name (agent/builtin_models.py) is prepared and cached
    served_model_name: str = ""  # "" = derived from the model
    vllm_args: tuple[str, ...] = ()
    gpus: int = 0  # CUDA GPUs found; 0 = CPU build flags
    port_offset: int = 0
    host: str = "127.0.0.1"  # where Envoy (the API) and the UI listen
    node: str = field(default_factory=local_node_name)
    service: str = "ernie"
    run_dir: Path = field(default_factory=default_run_dir)
    ui: bool = True
    ui_venv: Path = field(default_factory=default_ui_venv)
    prometheus: bool = True  # required with the dashboard; else started only if installed
    dashboard: bool = True  # the live dashboard (agent/dashboard) on 127.0.0.1:8090; off without Prometheus
    drain_deadline_s: float = DRAIN_DEADLINE_S

    def __post_init__(self) -> None:
        if self.engine_kind not in ENGINE_KINDS:
            raise ConfigError(f"--engine-kind must be one of {', '.join(ENGINE_KINDS)}, got {self.engine_kind!r}")
        if not (1 <= self.engines <= MAX_ENGINES):
            raise ConfigError(f"--engines must be 1-{MAX_ENGINES}, got {self.engines}")
        if not (0 <= self.port_offset <= MAX_PORT_OFFSET):
            raise ConfigError(f"--port-offset must be 0-{MAX_PORT_OFFSET}, got {self.port_offset}")
        if not self.prometheus:
            object.__setattr__(self, "dashboard", False)  # it reads Prometheus: no Prometheus, no dashboard
        if self.engine_kind == "simulated" and self.model:
            raise ConfigError("--model is for real engines: a simulated engine generates no real text")
        object.__setattr__(self, "run_dir", Path(self.run_dir).resolve())

    # --- ports ---------------------------------------------------------------------------------

    def port(self, default: int) -> int:
        return default + self.port_offset

    def engine_port(self, i: int) -> int:
        return self.port(ENGINE_PORT_BASE + 1 + i)

    def agent_port(self, i: int) -> int:
        return self.port(AGENT_PORT_BASE + 1 + i)

    @property
    def consul_http_port(self) -> int:
        return self.port(CONSUL_HTTP_PORT)

    @property
    def gateway_port(self) -> int:
        return self.port(GATEWAY_PORT)

    @property
    def ui_port(self) -> int:
        return self.port(UI_PORT)

    @property
    def prometheus_port(self) -> int:
        return self.port(PROMETHEUS_PORT)

    @property
    def dashboard_port(self) -> int:
        return self.port(DASHBOARD_PORT)

    def ports(self) -> list[tuple[str, str, int]]:
        """(host, what, port) for every TCP port the mesh listens on: all must be free before `up`."""
        lo = "127.0.0.1"
        out = [
            (lo, "Consul HTTP", self.consul_http_port),
            (lo, "Consul DNS", self.port(CONSUL_DNS_PORT)),
            (lo, "Consul server RPC", self.port(CONSUL_SERVER_PORT)),
            (lo, "Consul serf LAN", self.port(CONSUL_SERF_LAN_PORT)),
            (lo, "Consul serf WAN", self.port(CONSUL_SERF_WAN_PORT)),
            (self.host, "Envoy (the OpenAI API)", self.gateway_port),
            (lo, "Envoy admin", self.port(ENVOY_ADMIN_PORT)),
            (lo, "gateway xDS", self.port(XDS_PORT)),
            (lo, "gateway metrics", self.port(GATEWAY_METRICS_PORT)),
        ]
        for i in range(self.engines):
            out.append((lo, f"engine {i + 1}", self.engine_port(i)))
            out.append((lo, f"engine agent {i + 1}", self.agent_port(i)))
        if self.ui:
            out.append((self.host, "Chainlit UI", self.ui_port))
        if self.dashboard:  # then Prometheus is required too: its port must be free
            out.append((lo, "Prometheus", self.prometheus_port))
            out.append((lo, "dashboard", self.dashboard_port))
        return out

    # --- URLs ----------------------------------------------------------------------------------

    @property
    def consul_address(self) -> str:
        return f"127.0.0.1:{self.consul_http_port}"

    def _url(self, port: int) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        return self._url(self.gateway_port) + "/v1"

    @property
    def api_key_path(self) -> Path:
        return self.run_dir / "api-key"

    @property
    def consul_acl(self) -> LocalAcl:
        """Consul's ACL tokens of this mesh, one per role (<run_dir>/consul-tokens, 0700)."""
        return LocalAcl(self.run_dir / "consul-tokens")

    @property
    def control_token_path(self) -> Path:
        """The engine agents' control token (POST /drain; `ernie-mesh drain --token-file`), 0600."""
        return self.run_dir / "control-token"

    def api_key(self) -> str:
        """The key `up` created (empty before it has)."""
        try:
            return self.api_key_path.read_text().strip()
        except OSError:
            return ""

    @property
    def ui_url(self) -> str:
        return self._url(self.ui_port)

    @property
    def consul_ui_url(self) -> str:
        return f"http://{self.consul_address}/ui"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def dashboard_command(self) -> list[str]:
        """The dashboard on loopback (docs/security.md), reading this mesh's Prometheus and Consul."""
        return [
            sys.executable,
            "-m",
            "agent",
            "dashboard",
            "--prometheus",
            self.prometheus_url,
            "--consul",
            self.consul_address,
            "--service",
            self.service,
            "--listen",
            f"127.0.0.1:{self.dashboard_port}",
        ]

    def top_command(self) -> str:
        """`ernie-mesh top` for this mesh, as the banner prints it."""
        if not self.port_offset:
            return "ernie-mesh top"
        return f"ernie-mesh top --prometheus {self.prometheus_url} --consul {self.consul_address}"

    # --- paths ---------------------------------------------------------------------------------

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def state_path(self) -> Path:
        return self.run_dir / "up.json"

    # --- engines -------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The model name clients send (`model` in the OpenAI API)."""
        if self.served_model_name:
            return self.served_model_name
        if self.engine_kind == "simulated":
            return SIMULATED_MODEL_NAME
        return self.model or DEFAULT_SERVED_MODEL_NAME

    @property
    def builtin_model(self) -> BuiltinModel | None:
        """The model `up` builds itself (the embedded default, `tiny-ernie`), None for a hub name or
        directory vLLM loads, or for simulated engines."""
        return builtin(self.model) if self.engine_kind == "vllm" else None

    def instance_id(self, i: int) -> str:
        return self.instance_id_at(self.engine_port(i))

    def instance_id_at(self, port: int) -> str:
        # the engines listen on 127.0.0.1 (their default host), advertise_address 127.0.0.1
        return instance_id(self.service, self.node, "127.0.0.1", port)

    def engine_table(self, i: int, model_path: str) -> dict[str, Any]:
        """Engine `i` of the engines `up` starts."""
        port = self.engine_port(i)
        table: dict[str, Any]
        if self.engine_kind == "simulated":
            table = {"kind": "simulated", "port": port, "served_model_name": self.model_name}
        else:
            gpu = (i % self.gpus) if self.gpus else None
            table = vllm_engine(port, model_path, self.model_name, gpu, cpu_index=i, engines=self.engines)
            table["args"] = list(table.get("args", [])) + list(self.vllm_args)
        table["shutdown_timeout_s"] = ENGINE_SHUTDOWN_TIMEOUT_S
        return table

    def added_engine_table(
        self,
        port: int,
        engine_kind: str,
        model_path: str,
        model_name: str,
        placement: Placement,
        vllm_args: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """One more engine for the running mesh (`ernie-mesh add`): its own port, kind, model and
        placement; `vllm_args` None = the mesh's --vllm-args."""
        table: dict[str, Any]
        if engine_kind == "simulated":
            table = {"kind": "simulated", "port": port, "served_model_name": model_name}
        else:
            table = vllm_engine(port, model_path, model_name, placement.gpu, cpu_bind=placement.cpu_bind)
            extra = self.vllm_args if vllm_args is None else vllm_args
            table["args"] = list(table.get("args", [])) + list(extra)
        table["shutdown_timeout_s"] = ENGINE_SHUTDOWN_TIMEOUT_S
        return table

    def engine_agent_toml(
        self, i: int, model_path: str, engine: dict[str, Any] | None = None, agent_port: int | None = None
    ) -> str:
        """Engine agent `i`'s engine.toml (`engine`/`agent_port`: an added engine's own)."""
        return tomli_w.dumps(
            {
                "listen": f"127.0.0.1:{agent_port or self.agent_port(i)}",
                "node": self.node,
                "advertise_address": "127.0.0.1",
                "zone": "local",
                "log_dir": str(self.log_dir),
                "drain_deadline_s": self.drain_deadline_s,
                "control_token_file": str(self.control_token_path),
                "consul": {
                    "address": self.consul_address,
                    "service": self.service,
                    "token_file": str(self.consul_acl.path("engine")),
                },
                "engines": [engine or self.engine_table(i, model_path)],
            }
        )

    # --- gateway, Consul -----------------------------------------------------------------------

    def gateway_toml(self) -> str:
        return tomli_w.dumps(
            {
                "name": self.node,
                "listen": f"{self.host}:{self.gateway_port}",
                "envoy_admin": f"127.0.0.1:{self.port(ENVOY_ADMIN_PORT)}",
                "xds": f"127.0.0.1:{self.port(XDS_PORT)}",
                "metrics": f"127.0.0.1:{self.port(GATEWAY_METRICS_PORT)}",
                "advertise_address": "127.0.0.1",
                "run_dir": str(self.run_dir / "gateway"),
                "drain_deadline_s": GATEWAY_DRAIN_DEADLINE_S,
                "consul": {
                    "address": self.consul_address,
                    "service": self.service,
                    "token_file": str(self.consul_acl.path("gateway")),
                },
            }
        )

    def consul_ports_json(self) -> str:
        return json.dumps(
            {
                "ports": {
                    "grpc": -1,
                    "server": self.port(CONSUL_SERVER_PORT),
                    "serf_lan": self.port(CONSUL_SERF_LAN_PORT),
                    "serf_wan": self.port(CONSUL_SERF_WAN_PORT),
                }
            }
        )

    def consul_command(self, consul_binary: str) -> list[str]:
        return [
            consul_binary,
            "agent",
            "-dev",
            "-bind=127.0.0.1",
            "-client=127.0.0.1",
            f"-http-port={self.consul_http_port}",
            f"-dns-port={self.port(CONSUL_DNS_PORT)}",
            f"-node={self.node}",
            f"-config-file={REPO_DIR / 'consul' / 'dev.hcl'}",
            f"-config-file={self.run_dir / 'consul-ports.json'}",
            f"-config-file={self.run_dir / 'consul-acl.json'}",
        ]

    def ui_command(self) -> list[str]:
        return [
            str(self.ui_venv / "bin" / "chainlit"),
            "run",
            "app.py",
            "--headless",
            "--host",
            self.host,
            "--port",
            str(self.ui_port),
        ]

    def ui_env(self) -> dict[str, str]:
        """The UI's environment, over `up`'s own (which passes ERNIE_MESH_UI_ORIGINS etc. through).
        Login is on when ERNIE_MESH_UI_USERS names a users file (made absolute: the UI runs in ui/);
        Chainlit then needs CHAINLIT_AUTH_SECRET: the environment's, else one derived from the API key
        (HMAC: stable across `up` runs like the key, and it does not reveal the key). The API key
        goes as its file (0600: the UI reads it again when it changes, so a new key needs no restart,
        and the key is in no process environment); Consul's address for the welcome's count of
        healthy instances (anonymous catalog reads are allowed in this mesh)."""
        env = {
            "ERNIE_MESH_API_URL": self.api_url,
            "ERNIE_MESH_API_KEY_FILE": str(self.api_key_path),
            "ERNIE_MESH_API_KEY": "",  # the file's key, not one left in `up`'s own environment
            "ERNIE_MESH_CONSUL_URL": f"http://{self.consul_address}",
            "ERNIE_MESH_SERVICE": self.service,
            "ERNIE_MESH_MODEL": self.model_name,
            "CHAINLIT_APP_ROOT": str(REPO_DIR / "ui"),
            "ERNIE_MESH_SIMULATED": "1" if self.engine_kind == "simulated" else "",
        }
        users = os.environ.get("ERNIE_MESH_UI_USERS", "")
        if users:
            env["ERNIE_MESH_UI_USERS"] = str(Path(users).expanduser().resolve())
            if not os.environ.get("CHAINLIT_AUTH_SECRET") and self.api_key():
                digest = hmac.new(self.api_key().encode(), b"ernie-mesh ui auth secret v1", hashlib.sha256)
                env["CHAINLIT_AUTH_SECRET"] = digest.hexdigest()
        return env

    def urls(self) -> dict[str, str]:
        out = {
            "api": self.api_url,
            "api_key_file": str(self.api_key_path),
            "consul_ui": self.consul_ui_url,
            "consul": f"http://{self.consul_address}",
        }
        if self.ui:
            out["ui"] = self.ui_url
        if self.dashboard:
            out["dashboard"] = self.dashboard_url
            out["prometheus"] = self.prometheus_url
        return out

    def spec(self) -> dict[str, Any]:
        """Every field, JSON-ready: `ernie-mesh add` rebuilds the running mesh's plan from up.json."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> MeshPlan:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in spec.items() if k in known}
        kw["vllm_args"] = tuple(kw.get("vllm_args", ()))
        for key in ("run_dir", "ui_venv"):
            if key in kw:
                kw[key] = Path(kw[key])
        return cls(**kw)

    def summary(self) -> dict[str, Any]:
        return {
            "spec": self.spec(),
            "engines": self.engines,
            "engine_kind": self.engine_kind,
            "model": self.model_name,
            "port_offset": self.port_offset,
            "node": self.node,
            "service": self.service,
            "run_dir": str(self.run_dir),
            "python": sys.executable,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
