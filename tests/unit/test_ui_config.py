"""The chat UI's settings (ui/ui_config.py: one line per bad value, the API key from its file, read
again when it changes) and its count of healthy instances (ui/ui_census.py, from Consul's answer)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ui"))
import ui_census  # noqa: E402
import ui_config  # noqa: E402

from agent.local.plan import MeshPlan  # noqa: E402


def test_defaults_and_values():
    cfg = ui_config.load({})
    assert (cfg.api_url, cfg.max_tokens, cfg.temperature, cfg.consul_url, cfg.service) == (
        "http://127.0.0.1:8080/v1",
        512,
        0.7,
        "http://127.0.0.1:8500",
        "ernie",
    )
    cfg = ui_config.load(
        {"ERNIE_MESH_MAX_TOKENS": "64", "ERNIE_MESH_TEMPERATURE": "0", "ERNIE_MESH_API_URL": "http://gw:9/v1/"}
    )
    assert (cfg.max_tokens, cfg.temperature, cfg.api_url) == (64, 0.0, "http://gw:9/v1")
    assert ui_config.load({"OPENAI_API_KEY": "sk-x"}).key_source() == "ERNIE_MESH_API_KEY"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("ERNIE_MESH_MAX_TOKENS", "abc", "not a whole number of tokens from 1 to"),
        ("ERNIE_MESH_MAX_TOKENS", "0", "not a whole number of tokens from 1 to"),
        ("ERNIE_MESH_MAX_TOKENS", "12.5", "not a whole number"),
        ("ERNIE_MESH_TEMPERATURE", "hot", "not a number from 0 to 2"),
        ("ERNIE_MESH_TEMPERATURE", "nan", "not a number from 0 to 2"),
        ("ERNIE_MESH_TEMPERATURE", "2.5", "not a number from 0 to 2"),
        ("ERNIE_MESH_API_URL", "127.0.0.1:8080", "not an http(s) URL"),
        ("ERNIE_MESH_CONSUL_URL", "http://h:port", "port that is not a number"),
        ("ERNIE_MESH_SIMULATED", "yes", "not 1 or 0"),
        ("ERNIE_MESH_API_KEY_FILE", "/nonexistent/key", "cannot read it"),
    ],
)
def test_a_bad_value_is_one_line_naming_it(name, value, says):
    with pytest.raises(ui_config.UiConfigError) as e:
        ui_config.load({name: value})
    assert str(e.value).startswith(name) and says in str(e.value) and "\n" not in str(e.value)


def test_max_tokens_of_the_settings_panel_is_checked_against_the_model():
    assert ui_config.parse_max_tokens("160", "Max tokens", 2047) == 160
    assert ui_config.parse_max_tokens(" 2047 ", "Max tokens", 2047) == 2047
    for bad in ("", "-5", "2048", "1e9", "many"):
        with pytest.raises(ui_config.UiConfigError, match="Max tokens: .* from 1 to 2047"):
            ui_config.parse_max_tokens(bad, "Max tokens", 2047)


def test_the_key_file_is_read_again_when_it_changes_and_must_be_private(tmp_path):
    key = tmp_path / "api-key"
    key.write_text("sk-first\n")
    key.chmod(0o644)
    with pytest.raises(ui_config.UiConfigError, match="every user of this host can read"):
        ui_config.load({"ERNIE_MESH_API_KEY_FILE": str(key)})
    key.chmod(0o600)
    cfg = ui_config.load({"ERNIE_MESH_API_KEY_FILE": str(key), "ERNIE_MESH_API_KEY": "sk-env"})
    assert "sk-" not in cfg.key_source() and str(key) in cfg.key_source()
    source = ui_config.KeyFile(cfg.api_key_file)
    assert source.key() == "sk-first"
    key.write_text("# rotated\nsk-second-key\n")
    assert source.key() == "sk-second-key" and not source.error
    key.write_text("")
    assert source.key() == "sk-second-key" and "empty" in source.error  # the last good key is kept
    key.unlink()
    assert source.key() == "sk-second-key" and "cannot read it" in source.error


def test_up_gives_the_ui_its_key_file_and_consul(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIE_MESH_API_KEY", "sk-from-the-shell")
    plan = MeshPlan(run_dir=tmp_path, port_offset=100)
    env = plan.ui_env()
    assert env["ERNIE_MESH_API_KEY_FILE"] == str(plan.api_key_path) and env["ERNIE_MESH_API_KEY"] == ""
    assert env["ERNIE_MESH_CONSUL_URL"] == f"http://{plan.consul_address}" and env["ERNIE_MESH_SERVICE"] == "ernie"


def node(model: str, *statuses: str, served: bool = True) -> dict:
    meta = {"served_model_name": model, "model": "/path/" + model} if served else {"model": model}
    return {"Service": {"ID": f"{model}-x", "Meta": meta}, "Checks": [{"Status": s} for s in statuses]}


def test_the_census_counts_instances_whose_every_check_passes():
    nodes = [
        node("smollm2", "passing", "passing"),
        node("smollm2", "passing", "critical"),  # its node's check failing: not routed
        node("smollm2", "warning"),  # draining
        node("tiny-ernie", "passing"),
        node("raw", "passing", served=False),
        node("smollm2"),  # no check at all
    ]
    got = ui_census.census_of(nodes)
    assert got == {
        "smollm2": ui_census.ModelHealth(1, 4),
        "tiny-ernie": ui_census.ModelHealth(1, 1),
        "raw": ui_census.ModelHealth(1, 1),
    }
    census = ui_census.Census(got)
    assert census.describe("smollm2") == "**1 of 4** instances healthy"
    assert census.describe("tiny-ernie") == "**1 of 1** instance healthy"
    assert "no instance" in census.describe("other")
    assert "none of its 2 instances is healthy" in ui_census.Census({"m": ui_census.ModelHealth(0, 2)}).describe("m")


def test_the_census_says_why_it_is_unknown():
    census = asyncio.run(ui_census.read_census("http://127.0.0.1:9", "ernie", timeout_s=2))
    assert "unreachable" in census.error and "unknown" in census.describe("smollm2")
