"""Bad config fails at start: one line, exit code 2 (run as a real process, as a user would)."""

import ipaddress
import os
import subprocess
import sys

import pytest

from agent.config import ConfigError
from agent.engine import config as engine_config


def run_engine(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "agent", "engine", *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("ttl_s = 'ten'\n[[engines]]\nkind='simulated'\nport=8001\n", "ttl_s: expected float, got 'ten'"),
        ("bogus = 1\n[[engines]]\nkind='simulated'\nport=8001\n", "unknown key 'bogus'"),
        ("zone = 'a'\n", "no [[engines]] configured"),
        ("[[engines]]\nport = 8001\n", "`model` is required"),
        ("[[engines]]\nkind='simulated'\nport = 70000\n", "port must be 1-65535"),
        ("[[engines]]\nkind='tpu'\nport = 1\n", "engine kind must be one of"),
        ("listen = 'nope'\n[[engines]]\nkind='simulated'\nport=8001\n", "listen: expected host:port"),
        ("[[engines]\n", "invalid TOML"),
        ("[consul]\naddress='bad:addr:x'\n[[engines]]\nkind='simulated'\nport=8001\n", "consul.address 'bad:addr:x'"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, toml, expected):
    f = tmp_path / "engine.toml"
    f.write_text(toml)
    r = run_engine("--config", str(f))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ernie-mesh engine: ")
    assert expected in lines[0]


def test_missing_config_file_exits_2():
    r = run_engine("--config", "/nonexistent/engine.toml")
    assert r.returncode == 2
    assert r.stderr.strip() == "ernie-mesh engine: config file /nonexistent/engine.toml not found"


def test_missing_model_directory_exits_2():
    r = run_engine("--engine", "vllm:8001:/nonexistent/model", "--advertise-address", "127.0.0.1")
    assert r.returncode == 2
    assert "model directory /nonexistent/model does not exist" in r.stderr


def test_env_and_flags_override_file(tmp_path, monkeypatch):
    f = tmp_path / "engine.toml"
    f.write_text("zone = 'file'\n[consul]\naddress = '10.0.0.1:8500'\n[[engines]]\nkind='simulated'\nport=8001\n")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:18500")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "secret")
    monkeypatch.setenv("ERNIE_MESH_ZONE", "env")
    cfg = engine_config.load(["--config", str(f), "--node", "n9", "--advertise-address", "127.0.0.1"])
    assert cfg.consul.address == "127.0.0.1:18500"
    assert cfg.consul.token == "secret"
    assert cfg.zone == "env"
    cfg = engine_config.load(["--config", str(f), "--zone", "flag", "--advertise-address", "127.0.0.1"])
    assert cfg.zone == "flag"
    assert cfg.node  # defaults to the hostname


def test_ttl_must_cover_several_probes():
    with pytest.raises(ConfigError, match="ttl_s"):
        engine_config.build(
            engine_config.EngineAgentConfig, {"ttl_s": 1, "engines": [{"kind": "simulated", "port": 8001}]}
        )


def test_several_cpu_engines_of_one_agent_get_their_own_cores():
    from agent.engine.cpu import BIND_VAR, core_share, spread

    assert [core_share(i, 2, [0, 1, 2, 3]) for i in range(2)] == ["0-1", "2-3"]
    assert [core_share(i, 3, [0, 1]) for i in range(3)] == ["0", "1", "0"]
    envs = spread([{}, {BIND_VAR: "7"}, {"X": "1"}])
    assert envs[1][BIND_VAR] == "7" and envs[0][BIND_VAR] != envs[2][BIND_VAR] and envs[2]["X"] == "1"
    assert spread([{}]) == [{}]  # a single engine keeps vLLM's default


def test_the_agent_spreads_its_vllm_engines_over_the_cores(tmp_path):
    from agent.engine.config import load
    from agent.engine.cpu import BIND_VAR

    f = tmp_path / "engine.toml"
    f.write_text(
        "[[engines]]\nport = 8001\nmodel = '/m'\n[[engines]]\nport = 8002\nmodel = '/m'\n"
        "[[engines]]\nkind = 'simulated'\nport = 8003\n"
    )
    cfg = load(["--config", str(f), "--advertise-address", "127.0.0.1"])
    binds = [dict(e.env).get(BIND_VAR) for e in cfg.engines]
    assert binds[0] and binds[1] and binds[0] != binds[1] and binds[2] is None, binds


# --- loopback: registered only when configured explicitly (issue 12, item 14) ----------------------


def _registered_addresses(cfg):
    import httpx

    from agent.catalog.memory import MemoryCatalog
    from agent.engine.instance import InstanceController
    from agent.engine.metrics import EngineAgentMetrics

    return [
        InstanceController(cfg, spec, MemoryCatalog(), httpx.AsyncClient(), EngineAgentMetrics()).registration().address
        for spec in cfg.engines
    ]


def test_the_help_example_registers_addresses_other_hosts_reach(tmp_path, monkeypatch):
    """Before: an engine.toml written after `ernie-mesh engine --help` registered 127.0.0.1, and
    gateways on other hosts dialled their own loopback."""
    for var in ("CONSUL_HTTP_ADDR", "ERNIE_MESH_ADVERTISE_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    lines = engine_config.HELP.split("e.g.:\n", 1)[1].split("\nPrecedence", 1)[0].splitlines()
    example = "\n".join(line[2:] for line in lines if line.startswith("  "))
    assert "[[engines]]" in example
    f = tmp_path / "engine.toml"
    f.write_text(example)
    cfg = engine_config.load(["--config", str(f)])
    addresses = _registered_addresses(cfg)
    assert addresses and not any(ipaddress.ip_address(a).is_loopback for a in addresses), addresses


@pytest.mark.parametrize(
    "toml, names",
    [
        # the engines' default host is 127.0.0.1
        ("[[engines]]\nkind='simulated'\nport=8001\n", "set host ="),
        ("advertise_address='192.0.2.7'\n[[engines]]\nkind='simulated'\nport=8001\n", "set host ="),
        ("[[engines]]\nkind='simulated'\nport=8001\nhost='::1'\n", "set host ="),
        ("[[engines]]\nurl='http://127.0.0.1:8002'\n", "url"),
        ("[[engines]]\nurl='http://localhost:8002/v1'\n", "url"),
        # listening everywhere, the advertised address derived from the route to a local Consul
        ("[consul]\naddress='127.0.0.1:8500'\n[[engines]]\nkind='simulated'\nport=8001\nhost='0.0.0.0'\n", "advertise"),
    ],
)
def test_a_loopback_address_is_refused_unless_configured_explicitly(tmp_path, monkeypatch, toml, names):
    for var in ("CONSUL_HTTP_ADDR", "ERNIE_MESH_ADVERTISE_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    f = tmp_path / "engine.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match="loopback") as err:
        engine_config.load(["--config", str(f)])
    assert names in str(err.value) and 'advertise_address = "127.0.0.1"' in str(err.value)
    assert "\n" not in str(err.value)


def test_a_loopback_refusal_exits_2_with_one_line_saying_what_to_set(tmp_path):
    f = tmp_path / "engine.toml"
    f.write_text("[consul]\naddress='127.0.0.1:1'\n[[engines]]\nkind='simulated'\nport=8001\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CONSUL_HTTP_ADDR", "ERNIE_MESH_ADVERTISE_ADDRESS")}
    r = subprocess.run(
        [sys.executable, "-m", "agent", "engine", "--config", str(f)],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
    )
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("ernie-mesh engine: engine on port 8001 listens on 127.0.0.1, a loopback address")
    assert "set host =" in line


@pytest.mark.parametrize("how", ["file", "flag", "env"])
def test_an_explicit_loopback_advertise_address_allows_a_one_host_mesh(tmp_path, monkeypatch, how):
    for var in ("CONSUL_HTTP_ADDR", "ERNIE_MESH_ADVERTISE_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    f = tmp_path / "engine.toml"
    body = "[[engines]]\nkind='simulated'\nport=8001\n[[engines]]\nurl='http://127.0.0.1:8002'\n"
    f.write_text(("advertise_address = '127.0.0.1'\n" if how == "file" else "") + body)
    argv = ["--config", str(f)] + (["--advertise-address", "127.0.0.1"] if how == "flag" else [])
    if how == "env":
        monkeypatch.setenv("ERNIE_MESH_ADVERTISE_ADDRESS", "127.0.0.1")
    cfg = engine_config.load(argv)
    assert _registered_addresses(cfg) == ["127.0.0.1", "127.0.0.1"]


def test_the_local_mesh_config_registers_loopback_explicitly(tmp_path, monkeypatch):
    from agent.local.plan import MeshPlan

    for var in ("CONSUL_HTTP_ADDR", "ERNIE_MESH_ADVERTISE_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    f = tmp_path / "engine-1.toml"
    plan = MeshPlan(engines=1, engine_kind="simulated", run_dir=tmp_path / "run")
    plan.consul_acl.create_secrets()  # its Consul token file (up writes it before the agents start)
    f.write_text(plan.engine_agent_toml(0, "/m"))
    cfg = engine_config.load(["--config", str(f)])
    assert _registered_addresses(cfg) == ["127.0.0.1"]
