"""The Ansible filter plugins run on the controller and import nothing from the package: the facts
they copy must equal the package's, and the TOML they write must parse back to what they were given."""

from __future__ import annotations

import importlib.util
import math
import tomllib
from pathlib import Path

import pytest

from agent.engine.cpu import VLLM_CPU_ENV

FILTERS = Path(__file__).resolve().parents[2] / "deploy" / "ansible" / "filter_plugins"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"ernie_filter_{name}", FILTERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_vllm_env_is_the_packages():
    ernie = load("ernie")
    assert ernie.VLLM_CPU_ENV == VLLM_CPU_ENV
    [cpu] = ernie.ernie_engine_tables([{"port": 8001, "model": "/m"}], flavor="cpu", cpu_args=["--enforce-eager"])
    assert cpu["env"] == VLLM_CPU_ENV
    [own] = ernie.ernie_engine_tables(
        [{"port": 8001, "model": "/m", "env": {"VLLM_CPU_KVCACHE_SPACE": "4"}}], flavor="cpu"
    )
    assert own["env"] == {"VLLM_CPU_KVCACHE_SPACE": "4"}
    [gpu] = ernie.ernie_engine_tables([{"port": 8001, "model": "/m"}], flavor="gpu")
    assert "env" not in gpu


def test_instance_ids_are_the_engine_agents(tmp_path):
    """roles/ernie_engine waits for each instance by the ID its engine agent registers."""
    from agent.engine import config as engine_config

    ernie, toml = load("ernie"), load("toml")
    engines = [
        {"port": 8001, "model": "/m"},  # listens on the host's address
        {"port": 8002, "kind": "simulated", "host": "0.0.0.0"},  # everywhere: the advertised address
        {"url": "http://192.0.2.9:8003"},
        {"kind": "attach", "url": "http://[2001:db8::9]:8004/v1", "port": 8004},
    ]
    tables = ernie.ernie_engine_tables(engines, flavor="gpu", host_address="192.0.2.5")
    f = tmp_path / "engine.toml"
    f.write_text(
        "node = 'engine1'\nadvertise_address = '192.0.2.5'\n[consul]\nservice = 'svc'\n"
        + "".join("[[engines]]\n" + "".join(f"{k} = {toml.to_toml(v)}\n" for k, v in t.items()) for t in tables)
    )
    cfg = engine_config.load(["--config", str(f)])
    assert ernie.ernie_instance_ids(tables, "svc", "engine1", "192.0.2.5") == [cfg.instance_id(e) for e in cfg.engines]


VALUES = [
    "",
    "ernie",
    "127.0.0.1:8500",
    "/var/log/ernie-mesh/engines",
    "a b",
    'quote " and \\ backslash',
    "line\nbreak\ttab\rcr\bbs\fff",
    "\x01\x1f control",
    "del \x7f",
    "ünïcødé ✓ 漢字",
    "\u2028",
    "'single'",
    "#not a comment",
    "[not an array]",
    "{ not = a table }",
    0,
    1,
    -7,
    2**63 - 1,
    -(2**63),
    0.0,
    -0.0,
    0.3,
    120.0,
    1e100,
    1e-05,
    -2.5e-7,
    True,
    False,
    [],
    ["--enforce-eager", "--gpu-memory-utilization", "0.3"],
    [1, 2, 3],
    [[1, 2], ["a"]],
    [{"a": 1}],
    {},
    {"VLLM_CPU_KVCACHE_SPACE": "1", "CUDA_VISIBLE_DEVICES": "0,1"},
    {"a b": 1, "ü": [True], "x.y": {"z": 0.5}},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_to_toml_parses_back_to_its_input(value):
    text = load("toml").to_toml(value)
    assert "\n" not in text, "one template line per key"
    parsed = tomllib.loads(f"key = {text}\n")["key"]
    assert parsed == value
    if isinstance(value, float):
        assert math.copysign(1, parsed) == math.copysign(1, value)


@pytest.mark.parametrize("value", [None, float("nan"), float("inf")])
def test_to_toml_refuses_what_toml_cannot_say(value):
    from ansible.errors import AnsibleFilterError

    with pytest.raises(AnsibleFilterError):
        load("toml").to_toml(value)


def test_only_secrets_no_host_supplies_are_generated():
    ernie = load("ernie")
    hostvars = {"a": {"consul_encrypt_key": "k", "x": ""}, "b": {"y": "from vault"}}
    names = ["consul_encrypt_key", "x", "y", "z"]
    assert ernie.ernie_unsupplied(names, hostvars, ["a", "b"]) == ["x", "z"]
    assert ernie.ernie_unsupplied(names, hostvars, ["a"]) == ["x", "y", "z"]


def test_token_accessors_are_stable_per_role_and_secret_and_hide_it():
    ernie = load("ernie")
    a = ernie.ernie_token_accessor("engine", "11111111-2222-3333-4444-555555555555")
    assert a == ernie.ernie_token_accessor("engine", "11111111-2222-3333-4444-555555555555")  # a re-run finds it
    assert a != ernie.ernie_token_accessor("engine", "66666666-2222-3333-4444-555555555555")  # a rotation: a new one
    assert a != ernie.ernie_token_accessor("gateway", "11111111-2222-3333-4444-555555555555")
    assert "1111" not in a and len(a) == 36


def test_the_secrets_script_generates_once_keeps_and_rotates(tmp_path):
    import json
    import stat
    import subprocess
    import sys

    script = FILTERS.parent / "files" / "ernie_secrets.py"
    f = tmp_path / "ernie-secrets" / "secrets.yml"

    def run(*args):
        out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    first = run("secrets", "--file", str(f), "--need", "consul_encrypt_key", "t1", "t2")
    assert first["changed"] and stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE(f.parent.stat().st_mode) == 0o700
    import base64
    import uuid

    assert len(base64.b64decode(first["secrets"]["consul_encrypt_key"])) == 32  # `consul keygen`
    uuid.UUID(first["secrets"]["t1"])
    again = run("secrets", "--file", str(f), "--need", "consul_encrypt_key", "t1", "t2")
    assert not again["changed"] and again["secrets"] == first["secrets"]
    rotated = run("secrets", "--file", str(f), "--need", "consul_encrypt_key", "t1", "t2", "--rotate", "t2")
    assert rotated["changed"] and rotated["secrets"]["t2"] != first["secrets"]["t2"]
    assert rotated["secrets"]["t1"] == first["secrets"]["t1"]
    key = run("secrets", "--file", str(f), "--need", "ernie_gateway_api_key")["secrets"]["ernie_gateway_api_key"]
    assert key.startswith("sk-ernie-") and len(key) >= 40  # what `ernie-mesh keys add` makes

    tls = tmp_path / "ernie-secrets" / "tls"
    made = run("tls", "--dir", str(tls), "--datacenter", "dc1", "--server", "c1=10.0.0.1")
    assert made["changed"] and stat.S_IMODE((tls / "ca-key.pem").stat().st_mode) == 0o600
    assert not run("tls", "--dir", str(tls), "--datacenter", "dc1", "--server", "c1=10.0.0.1")["changed"]
    moved = run("tls", "--dir", str(tls), "--datacenter", "dc1", "--server", "c1=10.0.0.2")  # new address
    assert moved["changed"]
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tls / "server-c1.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "server.dc1.consul" in san.get_values_for_type(x509.DNSName)
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.2"}
