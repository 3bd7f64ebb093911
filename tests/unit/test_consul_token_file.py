"""The Consul ACL token from a file the agents re-read (consul.token_file / CONSUL_HTTP_TOKEN_FILE):
what lets deploy/ansible/rotate-tokens.yml switch a running agent to a new token without a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.catalog.consul import ConsulCatalog
from agent.config import ConfigError, ConsulConfig


def write_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    """As Ansible's copy does: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def test_the_token_file_is_re_read_when_it_changes(tmp_path: Path):
    f = tmp_path / "consul-token"
    write_atomically(f, "token-a\n")
    cat = ConsulCatalog("127.0.0.1:1", token_file=str(f))
    blocking = cat._blocking_client(30)
    assert (cat._client.token, blocking.token, cat.token_generation) == ("token-a", "token-a", 0)
    assert cat.token_generation == 0  # unchanged file: no new generation
    write_atomically(f, "token-b\n")
    assert cat.token_generation == 1
    assert (cat._client.token, blocking.token) == ("token-b", "token-b")
    # a broken file (every user can read it) is refused: the token read before stays in use
    write_atomically(f, "token-c\n", mode=0o644)
    assert cat.token_generation == 1 and cat._client.token == "token-b"


def test_an_explicit_token_wins_over_the_file_and_the_environment(tmp_path: Path, monkeypatch):
    f = tmp_path / "consul-token"
    write_atomically(f, "from-file\n")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    assert ConsulCatalog("127.0.0.1:1", token="explicit", token_file=str(f))._client.token == "explicit"
    assert ConsulCatalog("127.0.0.1:1", token_file=str(f))._client.token == "from-file"


def test_a_token_file_that_cannot_serve_is_a_config_error(tmp_path: Path):
    f = tmp_path / "consul-token"
    with pytest.raises(ConfigError, match="cannot read"):
        ConsulConfig(token_file=str(f))
    write_atomically(f, "t\n", mode=0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        ConsulConfig(token_file=str(f))
    write_atomically(f, "\n")
    with pytest.raises(ConfigError, match="empty"):
        ConsulConfig(token_file=str(f))
    write_atomically(f, "t\n")
    assert ConsulConfig(token_file=str(f)).token_file == str(f)


def test_an_https_address_is_verified_with_the_ca_file(tmp_path: Path, monkeypatch):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("CONSUL_CACERT", str(ca))
    cfg = ConsulConfig(address="https://127.0.0.1:8501", ca_file=str(ca))
    cat = ConsulCatalog.for_config(cfg)
    assert cat.address == "https://127.0.0.1:8501"
    assert cat._client.http.verify == str(ca) and cat._blocking_client(30).http.verify == str(ca)
    assert ConsulCatalog.from_env("https://127.0.0.1:8501")._client.http.verify == str(ca)
    with pytest.raises(ConfigError, match="ca_file"):
        ConsulConfig(ca_file=str(tmp_path / "missing.pem"))
