"""The engines' own API key on the gateway (issue 11, item 2): rendered for Envoy's credential
injector on the engines cluster only, accepted by Envoy, refreshed on change, refused when unsafe."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.envoy_support import envoy_validate
from agent.config import ConfigError
from agent.gateway import bootstrap, engine_credential
from agent.gateway.config import DEFAULT_BOOTSTRAP_TEMPLATE, EdgeSettings, GatewayConfig, finish
from agent.gateway.engine_credential import EngineCredential

ROOT = Path(__file__).resolve().parents[2]
KEY = "engine-key-0123456789"


def key_file(tmp_path: Path, text: str = KEY + "\n", mode: int = 0o600) -> str:
    path = tmp_path / "engine-api-key"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def cfg(tmp_path: Path, **kw) -> GatewayConfig:
    return finish(
        GatewayConfig(
            name="gw-test",
            listen="127.0.0.1:18080",
            envoy_admin="127.0.0.1:19901",
            xds="127.0.0.1:18001",
            metrics="127.0.0.1:19102",
            run_dir=str(tmp_path / "run"),
            **kw,
        )
    )


def clusters(c: GatewayConfig) -> dict[str, dict]:
    doc = yaml.safe_load(bootstrap.render(DEFAULT_BOOTSTRAP_TEMPLATE.read_text(), c))
    return {x["name"]: x for x in doc["static_resources"]["clusters"]}


def upstream_filters(cluster: dict) -> list[str]:
    options = cluster.get("typed_extension_protocol_options", {})
    http = options.get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
    return [f["name"] for f in http.get("http_filters", [])]


def test_the_key_is_injected_on_the_engines_cluster_only_and_envoy_accepts_it(tmp_path):
    """Failed before: nothing added the engines' key (engines with --api-key refused every request)."""
    c = cfg(tmp_path, engine_api_key_file=key_file(tmp_path), edge=EdgeSettings(api_keys="off"))
    EngineCredential(c.engine_api_key_file, c.engine_credential_dir).prepare()  # Envoy needs the SDS file
    found = clusters(c)
    assert upstream_filters(found["ernie"]) == [
        "envoy.filters.http.credential_injector",
        "envoy.filters.http.upstream_codec",
    ]
    injector = found["ernie"]["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    config = injector["http_filters"][0]["typed_config"]
    assert config["overwrite"] is True and config["allow_request_without_credential"] is False
    assert all(upstream_filters(x) == [] for name, x in found.items() if name != "ernie")  # relay, xDS: never
    text = bootstrap.render(DEFAULT_BOOTSTRAP_TEMPLATE.read_text(), c)
    assert KEY not in text  # the bootstrap names the SDS file; the key is in that file alone
    path = tmp_path / "bootstrap.yaml"
    path.write_text(text)
    out = envoy_validate(path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_without_a_key_the_engines_cluster_is_as_before(tmp_path):
    assert upstream_filters(clusters(cfg(tmp_path))["ernie"]) == []


def test_the_key_file_is_rendered_private_and_followed(tmp_path):
    c = cfg(tmp_path, engine_api_key_file=key_file(tmp_path, "# engines\nfirst-key\nsecond-key\n"))
    cred = EngineCredential(c.engine_api_key_file, c.engine_credential_dir)
    assert cred.sync() is True
    sds = Path(c.engine_credential_dir) / engine_credential.SDS_FILE
    assert stat.S_IMODE(os.stat(sds).st_mode) == 0o600 and stat.S_IMODE(os.stat(sds.parent).st_mode) == 0o700
    [secret] = json.loads(sds.read_text())["resources"]
    assert secret["generic_secret"]["secret"]["inline_string"] == "Bearer first-key"  # the first line is sent
    assert cred.sync() is False  # unchanged file: nothing rewritten
    Path(c.engine_api_key_file).write_text("rotated-key\n")
    os.utime(c.engine_api_key_file, (1, 1))  # a new mtime even within the clock's resolution
    assert cred.sync() is True
    assert "Bearer rotated-key" in sds.read_text()


def test_an_unsafe_or_missing_key_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="every user"):
        c = cfg(tmp_path, engine_api_key_file=key_file(tmp_path, mode=0o644))
        EngineCredential(c.engine_api_key_file, c.engine_credential_dir).prepare()
    with pytest.raises(ConfigError, match="engine_api_key_file"):
        EngineCredential(str(tmp_path / "missing"), str(tmp_path / "d")).prepare()
    with pytest.raises(ConfigError, match="absolute path"):
        cfg(tmp_path, engine_api_key_file="relative/key")


def test_the_gateway_stops_with_one_line_on_a_world_readable_key_file(tmp_path):
    path = key_file(tmp_path, mode=0o644)
    conf = tmp_path / "gateway.toml"
    conf.write_text(f'engine_api_key_file = "{path}"\nrun_dir = "{tmp_path / "run"}"\n')
    out = subprocess.run(
        [sys.executable, "-m", "agent", "gateway", "--config", str(conf), "--api-keys", "off"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "engine_api_key_file" in out.stderr and KEY not in out.stderr
