"""Secrets hygiene of the engine agent (issue 11, item 7): the agent's credentials are not
inherited by the engines it starts, never in their command line as logged, and the Ansible
engine role keeps the files that may hold secrets private."""

from __future__ import annotations

from pathlib import Path

import yaml

from agent.engine import supervisor
from agent.engine.config import EngineSpec

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "deploy/ansible/roles/ernie_engine"


def test_the_engine_inherits_no_consul_token_nor_the_control_token_file(monkeypatch):
    """Failed before: engine_env copied the agent's environment, CONSUL_HTTP_TOKEN included."""
    secret_env = {
        "CONSUL_HTTP_TOKEN": "consul-secret",
        "CONSUL_HTTP_TOKEN_FILE": "/etc/consul-token",
        "CONSUL_HTTP_AUTH": "user:pass",
        "CONSUL_CLIENT_KEY": "/etc/consul/client.key",
        "ERNIE_MESH_CONTROL_TOKEN_FILE": "/etc/ernie-mesh/control-token",
    }
    for k, v in secret_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:8500")
    monkeypatch.setenv("HF_HOME", "/models")
    for kind in ("vllm", "simulated"):
        env = supervisor.engine_env(EngineSpec(port=8001, kind=kind, model="m", env={"CUDA_VISIBLE_DEVICES": "1"}))
        assert not set(secret_env) & set(env), kind
        assert env["HF_HOME"] == "/models" and env["CUDA_VISIBLE_DEVICES"] == "1"  # the rest is passed on
    # set explicitly for an engine in its [[engines]] env table: the operator's choice, kept
    explicit = supervisor.engine_env(EngineSpec(port=8001, kind="simulated", env={"CONSUL_HTTP_TOKEN": "mine"}))
    assert explicit["CONSUL_HTTP_TOKEN"] == "mine"


def test_secret_flags_are_not_logged_with_the_engine_command_line():
    cmd = ["python", "-m", "vllm", "--api-key", "k1", "--hf-token=hf_abc", "--port", "8001", "--api-key=k2"]
    shown = supervisor.redacted(cmd)
    assert "k1" not in shown and "hf_abc" not in shown and "k2" not in shown
    assert shown == "python -m vllm --api-key *** --hf-token=*** --port 8001 --api-key=***"


def tasks(name: str) -> list[dict]:
    return yaml.safe_load((ROLE / "tasks" / name).read_text()) or []


def test_the_engine_role_keeps_its_config_and_secrets_private():
    """engine.toml may carry an engine's env (tokens): 0600 like engine.env and the secret files.
    Failed before: engine.toml was 0644."""
    by_dest = {}
    for t in tasks("main.yml"):
        for module in ("ansible.builtin.template", "ansible.builtin.file", "ansible.builtin.copy"):
            if module in t:
                by_dest[t[module].get("dest") or t[module].get("path")] = (t[module], t)
    for dest in (
        "{{ ernie_config_dir }}/engine.toml",
        "{{ ernie_config_dir }}/engine.env",
        "{{ ernie_config_dir }}/control-token",
        "{{ ernie_config_dir }}/engine-api-key",
    ):
        args, task = by_dest[dest]
        assert args.get("mode") == "0600", (dest, args)
        if dest.endswith(("engine.env", "engine-api-key")):
            assert task.get("no_log") is True  # its content is a secret (the Consul token, the engines' key)
        if not dest.endswith("engine.env"):  # read by systemd (root) for the unit
            assert args.get("owner") == "{{ ernie_user }}", (dest, args)  # the agent reads it as its user


def test_the_engine_role_logs_no_task_that_carries_a_token():
    """A task whose arguments hold the Consul token (a uri header, an environment) prints them when it
    fails or runs with -v: no_log. Failed before: the wait for passing instances had none."""
    carrying = []
    for path in sorted((ROLE / "tasks").glob("*.yml")):
        for t in tasks(path.name):
            text = yaml.safe_dump(t)
            if "ernie_engine_consul_token" in text and not t.get("name", "").startswith("engine.env"):
                carrying.append((path.name, t.get("name"), t.get("no_log")))
    assert carrying, "no task carries the token: the check would prove nothing"
    assert all(no_log is True for _f, _n, no_log in carrying), carrying
