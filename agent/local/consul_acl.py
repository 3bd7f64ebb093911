"""Consul's ACLs for the local mesh (`ernie-mesh up`): on, default deny, one least-privilege token
per role, as the Ansible consul role sets them up on hosts (deploy/ansible/roles/consul).

    management  Consul's initial management token (the dev agent's own token too); used here only
                to create the others
    engine      the engine agents: write the `ernie` service and its checks, read the catalog
    gateway     the gateway agent: write `ernie-gateway`, read the catalog and the API keys (KV)
    operator    the CLI (`ernie-mesh keys`, `up` itself): write the API keys, read the catalog
    anonymous   no token (DNS `ernie.service.consul`, `ernie-mesh status`, Prometheus' discovery,
                the Consul UI's view): read the catalog, nothing else

Each secret is a random UUID in <run_dir>/consul-tokens/<role> (0600, a directory of 0700). Consul
scopes service ACLs by name: an engine token can register any instance of `ernie`, not only its
own (docs/security.md, the threat table)."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from agent.gateway.keys import KV_PREFIX
from agent.gateway.rendered import private_dir, write_private
from agent.naming import GATEWAY_SERVICE

ROLES = ("management", "engine", "gateway", "operator")
ANONYMOUS_TOKEN = "00000000-0000-0000-0000-000000000002"  # Consul's anonymous token's accessor ID
TIMEOUT_S = 10.0


def rules(service: str) -> dict[str, str]:
    """Each policy's rules (HCL; the same syntax in Consul 1.8 and today)."""
    read = 'service_prefix "" { policy = "read" }\nnode_prefix "" { policy = "read" }\n'
    return {
        "ernie-engine": f'service "{service}" {{ policy = "write" }}\n{read}agent_prefix "" {{ policy = "read" }}\n',
        "ernie-gateway": (
            f'service "{GATEWAY_SERVICE}" {{ policy = "write" }}\n{read}'
            f'key_prefix "{KV_PREFIX}" {{ policy = "read" }}\nagent_prefix "" {{ policy = "read" }}\n'
        ),
        "ernie-operator": f'{read}key_prefix "{KV_PREFIX}" {{ policy = "write" }}\n',
        "ernie-anonymous-read": f'{read}query_prefix "" {{ policy = "read" }}\n',
    }


POLICY_OF = {"engine": "ernie-engine", "gateway": "ernie-gateway", "operator": "ernie-operator"}


@dataclass(frozen=True)
class LocalAcl:
    directory: Path  # <run_dir>/consul-tokens

    def path(self, role: str) -> Path:
        return self.directory / role

    def secret(self, role: str) -> str:
        return self.path(role).read_text().strip()

    def create_secrets(self) -> None:
        """A new random secret per role (the dev agent keeps no state: a new mesh, new tokens)."""
        private_dir(self.directory)
        for role in ROLES:
            write_private(self.path(role), f"{uuid.uuid4()}\n")

    def agent_config(self, consul_version: tuple[int, int]) -> str:
        """The dev agent's ACL settings (JSON). Consul 1.11 renamed `master` initial_management."""
        management = self.secret("management")
        name = "initial_management" if consul_version >= (1, 11) else "master"
        return json.dumps(
            {
                "acl": {
                    "enabled": True,
                    "default_policy": "deny",
                    "down_policy": "extend-cache",
                    "tokens": {name: management, "agent": management},
                }
            }
        )

    def bootstrap(self, consul_address: str, service: str) -> None:
        """Create the policies and the role tokens, and let the anonymous token read the catalog."""
        headers = {"X-Consul-Token": self.secret("management")}
        with httpx.Client(base_url=f"http://{consul_address}", headers=headers, timeout=TIMEOUT_S) as http:
            for name, text in rules(service).items():
                _ok(http.put("/v1/acl/policy", json={"Name": name, "Rules": text}), f"policy {name}")
            for role, policy in POLICY_OF.items():
                body = {
                    "SecretID": self.secret(role),
                    "Description": f"ernie-mesh up: {role}",
                    "Policies": [{"Name": policy}],
                }
                _ok(http.put("/v1/acl/token", json=body), f"token {role}")
            anonymous = {"Description": "Anonymous: catalog reads", "Policies": [{"Name": "ernie-anonymous-read"}]}
            _ok(http.put(f"/v1/acl/token/{ANONYMOUS_TOKEN}", json=anonymous), "anonymous token")


def _ok(r: httpx.Response, what: str) -> None:
    if r.status_code != 200:
        raise RuntimeError(f"Consul ACL bootstrap: {what}: HTTP {r.status_code}: {r.text.strip()[:200]}")


def consul_version(binary: str) -> tuple[int, int]:
    """(major, minor) of `consul version`; (0, 0) if it cannot be read."""
    try:
        out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=TIMEOUT_S).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    m = re.search(r"Consul v(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)
