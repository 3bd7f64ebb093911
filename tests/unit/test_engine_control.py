"""The engine agent's control endpoint (issue 11, item 6): POST /drain/<id> needs the control token;
the agent API listens on loopback unless told otherwise, and says so when it does not."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from agent.catalog.base import Verdict, VerdictState
from agent.config import ConfigError
from agent.engine import config as engine_config
from agent.engine.api import create_app
from agent.engine.cli import warn_exposure
from agent.engine.metrics import EngineAgentMetrics
from agent.secret_files import ensure_secret, read_secret, read_secrets

ROOT = Path(__file__).resolve().parents[2]
IID = "ernie-n1-127.0.0.1-8001"


class FakeInstance:
    def __init__(self) -> None:
        self.drains = 0
        self.verdict = Verdict(VerdictState.PASSING, "ok")
        self.drained = False

    def start_drain(self) -> None:
        self.drains += 1

    def describe(self) -> dict[str, object]:
        return {"id": IID, "state": "draining" if self.drains else "passing"}


def post_drain(token_file: str, headers: dict[str, str]) -> tuple[httpx.Response, FakeInstance]:
    instance = FakeInstance()
    app = create_app({IID: instance}, EngineAgentMetrics(), "n1", token_file)  # type: ignore[dict-item]

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as c:
            return await c.post(f"/drain/{IID}", headers=headers)

    return asyncio.run(go()), instance


def test_drain_needs_the_control_token(tmp_path):
    """Failed before: POST /drain/<id> started a drain for anyone (202 without a credential)."""
    token_file = tmp_path / "control-token"
    token = ensure_secret(token_file)
    assert oct(token_file.stat().st_mode & 0o777) == "0o600" and len(token) >= 40
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
        r, instance = post_drain(str(token_file), headers)
        assert r.status_code == 401, (headers, r.text)
        assert "control token" in r.json()["error"] and token not in r.text
        assert instance.drains == 0
    r, instance = post_drain(str(token_file), {"Authorization": f"Bearer {token}"})
    assert r.status_code == 202 and instance.drains == 1


def test_drain_is_refused_without_a_token_file_and_a_new_token_works_at_once(tmp_path):
    r, instance = post_drain("", {"Authorization": "Bearer anything"})
    assert r.status_code == 403 and "control_token_file" in r.json()["error"] and instance.drains == 0
    token_file = tmp_path / "control-token"
    ensure_secret(token_file)
    token_file.write_text("# rotated\nnew-token-0123456789\n")  # the file is re-read at each request
    assert post_drain(str(token_file), {"Authorization": "Bearer new-token-0123456789"})[0].status_code == 202


def test_secret_files_are_refused_when_every_user_can_read_them(tmp_path):
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="every user of this host can read") as e:
        read_secret(str(f), "control_token_file")
    assert "s3cret" not in str(e.value) and "chmod 600" in str(e.value)
    os.chmod(f, 0o640)
    assert read_secret(str(f), "x") == "s3cret"
    f.write_text("\n# only a comment\n")
    with pytest.raises(ConfigError, match="empty"):
        read_secret(str(f), "x")
    f.write_text("one two\n")
    with pytest.raises(ConfigError, match="one secret a line"):
        read_secret(str(f), "x")
    f.write_text("first\nsecond\n")
    assert read_secrets(str(f), "x") == ["first", "second"]
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret(str(tmp_path / "missing"), "x")


def test_a_world_readable_control_token_file_stops_the_agent_with_one_line(tmp_path):
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    os.chmod(f, 0o644)
    out = subprocess.run(
        [sys.executable, "-m", "agent", "engine", "--advertise-address", "127.0.0.1"]
        + ["--engine", "simulated:8001", "--control-token-file", str(f)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "control_token_file" in out.stderr and "s3cret" not in out.stderr


def cfg_listening(listen: str, token_file: str = "") -> engine_config.EngineAgentConfig:
    return engine_config.build(
        engine_config.EngineAgentConfig,
        {
            "listen": listen,
            "advertise_address": "127.0.0.1",
            "control_token_file": token_file,
            "engines": [{"kind": "simulated", "port": 8001}],
        },
    )


@pytest.mark.parametrize("listen", ["0.0.0.0:9100", "[::]:9100", ":9100", "10.0.0.7:9100"])
def test_the_agent_warns_when_its_api_listens_beyond_loopback(listen, caplog):
    with caplog.at_level(logging.INFO, logger="agent.engine"):
        warn_exposure(cfg_listening(listen))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "other hosts can read" in warnings[0], warnings
    assert "POST /drain is off" in caplog.text


@pytest.mark.parametrize("listen", ["127.0.0.1:9100", "localhost:9100", "[::1]:9100"])
def test_a_loopback_agent_api_is_not_warned_about(listen, caplog, tmp_path):
    token_file = tmp_path / "t"
    ensure_secret(token_file)
    with caplog.at_level(logging.INFO, logger="agent.engine"):
        warn_exposure(cfg_listening(listen, str(token_file)))
    assert caplog.records == []


def test_the_default_listen_is_loopback():
    assert engine_config.EngineAgentConfig.__dataclass_fields__["listen"].default == "127.0.0.1:9100"
