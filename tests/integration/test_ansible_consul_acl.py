"""The ACL module of the consul role (deploy/ansible/library/ernie_consul_acl.py) against a real
Consul with ACLs on (a dev agent): tokens found again by their derived AccessorID (changed=0), a
rotation's retire_others deleting the role's other tokens and nothing else, and a token made by
earlier versions (AccessorID from the role's name alone) replaced, secret kept."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from agent.local.binaries import consul_binary

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
MANAGEMENT = str(uuid.uuid4())
ANSIBLE_NS = uuid.UUID("361E6D51-FAEC-444A-9079-341386DA8E2E")  # Ansible's to_uuid namespace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def consul_acl(tmp_path: Path):
    http, serf, server = free_port(), free_port(), free_port()
    hcl = (
        f"ports {{ http = {http}, dns = -1, grpc = -1, serf_lan = {serf}, serf_wan = -1, server = {server} }}\n"
        f'acl {{ enabled = true, default_policy = "deny", tokens {{ master = "{MANAGEMENT}" }} }}\n'
    )
    (tmp_path / "acl.hcl").write_text(hcl)
    log = (tmp_path / "consul.log").open("w")
    proc = subprocess.Popen(
        [consul_binary(), "agent", "-dev", "-config-file", str(tmp_path / "acl.hcl")], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/v1/acl/tokens", headers={"X-Consul-Token": MANAGEMENT}, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, (tmp_path / "consul.log").read_text()[-2000:]
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


def tokens(url: str) -> dict[str, str]:
    r = httpx.get(f"{url}/v1/acl/tokens", headers={"X-Consul-Token": MANAGEMENT}, timeout=5)
    return {t["AccessorID"]: t.get("Description", "") for t in r.json()}


def play(tmp: Path, url: str, tasks: list[dict]) -> dict[str, int]:
    """Run the module's tasks on localhost; the recap's ok/changed counts."""
    book = [
        {
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars": {"ansible_python_interpreter": sys.executable},
            "tasks": [{"ernie_consul_acl": {**t, "address": url, "token": MANAGEMENT}, "no_log": False} for t in tasks],
        }
    ]
    (tmp / "play.yml").write_text(json.dumps(book))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    r = subprocess.run(
        [str(PLAYBOOK), "-i", "localhost,", str(tmp / "play.yml")],
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("localhost") and "ok=" in x)
    return {k: int(v) for k, v in (p.split("=") for p in line.split(":", 1)[1].split()) if k in ("ok", "changed")}


def accessor(role: str, secret: str) -> str:
    sys.path.insert(0, str(ANSIBLE_DIR / "filter_plugins"))
    try:
        import ernie  # the filter plugin: the playbooks derive the same value

        return ernie.ernie_token_accessor(role, secret)
    finally:
        sys.path.pop(0)


def token_task(role: str, secret: str, **extra) -> dict:
    return {
        "kind": "token",
        "name": role,
        "description": f"ernie-mesh {role} agents",
        "accessor_id": accessor(role, secret),
        "secret_id": secret,
        "policies": [],
        "legacy_accessor_id": str(uuid.uuid5(ANSIBLE_NS, f"ernie-mesh:{role}")),
        **extra,
    }


def test_tokens_found_again_rotated_and_an_earlier_versions_token_replaced(consul_acl: str, tmp_path: Path):
    url = consul_acl
    # a token made by earlier versions: AccessorID from the role's name, no role mark
    legacy = str(uuid.uuid5(ANSIBLE_NS, "ernie-mesh:engine"))
    old_secret = str(uuid.uuid4())
    r = httpx.put(
        f"{url}/v1/acl/token",
        headers={"X-Consul-Token": MANAGEMENT},
        json={"AccessorID": legacy, "SecretID": old_secret, "Description": "ernie-mesh engine agents"},
        timeout=5,
    )
    assert r.status_code == 200, r.text
    unrelated = httpx.put(
        f"{url}/v1/acl/token",
        headers={"X-Consul-Token": MANAGEMENT},
        json={"Description": "an operator's own token"},
        timeout=5,
    ).json()["AccessorID"]

    # the same secret again: the earlier token is replaced by one with the derived AccessorID
    assert play(tmp_path, url, [token_task("engine", old_secret)])["changed"] == 1
    have = tokens(url)
    assert legacy not in have and accessor("engine", old_secret) in have
    assert have[accessor("engine", old_secret)] == "[ernie-mesh:engine] ernie-mesh engine agents"
    # found again: nothing changes
    assert play(tmp_path, url, [token_task("engine", old_secret)])["changed"] == 0

    # a rotation: the new token beside the old, both work; then the old deleted, nothing else
    new_secret = str(uuid.uuid4())
    assert play(tmp_path, url, [token_task("engine", new_secret)])["changed"] == 1
    assert {accessor("engine", old_secret), accessor("engine", new_secret)} <= set(tokens(url))
    assert play(tmp_path, url, [token_task("engine", new_secret, retire_others=True)])["changed"] == 1
    have = tokens(url)
    assert accessor("engine", old_secret) not in have and accessor("engine", new_secret) in have
    assert unrelated in have  # not a token of the role
    assert play(tmp_path, url, [token_task("engine", new_secret, retire_others=True)])["changed"] == 0
