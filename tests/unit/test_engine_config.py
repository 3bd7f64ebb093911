"""Bad config fails at start: one line, exit code 2 (run as a real process, as a user would)."""

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
    r = run_engine("--engine", "vllm:8001:/nonexistent/model")
    assert r.returncode == 2
    assert "model directory /nonexistent/model does not exist" in r.stderr


def test_env_and_flags_override_file(tmp_path, monkeypatch):
    f = tmp_path / "engine.toml"
    f.write_text("zone = 'file'\n[consul]\naddress = '10.0.0.1:8500'\n[[engines]]\nkind='simulated'\nport=8001\n")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:18500")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "secret")
    monkeypatch.setenv("ERNIE_MESH_ZONE", "env")
    cfg = engine_config.load(["--config", str(f), "--node", "n9"])
    assert cfg.consul.address == "127.0.0.1:18500"
    assert cfg.consul.token == "secret"
    assert cfg.zone == "env"
    cfg = engine_config.load(["--config", str(f), "--zone", "flag"])
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
    cfg = load(["--config", str(f)])
    binds = [dict(e.env).get(BIND_VAR) for e in cfg.engines]
    assert binds[0] and binds[1] and binds[0] != binds[1] and binds[2] is None, binds
