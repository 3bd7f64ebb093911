"""Engines behind their own key (issue 11, item 2): the simulated engine checks vLLM's --api-key as
vLLM does, the engine agent gives its engines the key without argv and sends it with every probe."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import httpx
import pytest
import yaml

from agent.config import ConfigError
from agent.engine import config as engine_config
from agent.engine import supervisor
from agent.engine.config import EngineSpec
from agent.engine.probe import EngineProbe
from agent.sim.app import build_app
from agent.sim.cli import build_parser, expand_config
from agent.sim.engine import EngineConfig, SimEngine

KEYS = ("engine-key-1", "engine-key-2")


def sim_app(keys: tuple[str, ...]):
    return build_app(SimEngine(EngineConfig(name="sim", model="m")), api_keys=keys)


def call(app, method: str, path: str, key: str | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as c:
            body = {"model": "m", "prompt": "hi", "max_tokens": 1} if method == "POST" else None
            return await c.request(method, path, json=body, headers=headers)

    return asyncio.run(go())


def test_the_simulated_engine_checks_the_api_key_as_vllm_does():
    """Failed before: the simulated engine had no --api-key (every request answered)."""
    app = sim_app(KEYS)
    for path, method in (("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST")):
        for key in (None, "wrong", ""):
            r = call(app, method, path, key)
            assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}, (path, key, r.text)
    assert call(app, "GET", "/v1/models", KEYS[0]).status_code == 200
    assert call(app, "POST", "/v1/completions", KEYS[1]).status_code == 200  # any of the keys
    for path in ("/health", "/metrics", "/version"):  # vLLM guards /v1, /v2, /inference, /cohere only
        assert call(app, "GET", path).status_code == 200, path
    assert call(app, "OPTIONS", "/v1/models").status_code != 401
    assert call(sim_app(()), "GET", "/v1/models").status_code == 200  # no key: open, as vLLM


def test_the_simulated_engine_takes_keys_as_vllm_does(tmp_path):
    args = build_parser().parse_args(["--port", "1", "--api-key", "a", "--api-key", "b"])
    assert args.api_key == ["a", "b"]
    config = supervisor.write_keys_config(tmp_path / "keys", KEYS)
    argv = expand_config(["--port", "1", "--config", str(config)])
    assert build_parser().parse_args(argv).api_key == list(KEYS)


def test_one_key_goes_in_the_environment_several_in_a_private_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "inherited")  # the agent's own: not the engine's
    spec = EngineSpec(port=8001, kind="vllm", model="m")
    assert "VLLM_API_KEY" not in supervisor.engine_env(spec)
    assert supervisor.engine_env(spec, (KEYS[0],))["VLLM_API_KEY"] == KEYS[0]
    assert "VLLM_API_KEY" not in supervisor.engine_env(spec, KEYS)
    assert not any(k in " ".join(supervisor.engine_command(spec)) for k in KEYS)
    path = supervisor.write_keys_config(tmp_path / "keys", KEYS)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    # vLLM's --config reads YAML (JSON is YAML) and turns a list into `--api-key k1 k2` (checked
    # against vLLM 0.32's FlexibleArgumentParser: api_key == ['k1', 'k2'])
    assert yaml.safe_load(path.read_text()) == {"api-key": list(KEYS)}
    assert json.loads(path.read_text()) == {"api-key": list(KEYS)}


def agent_cfg(tmp_path: Path, keys: str, **engine) -> engine_config.EngineAgentConfig:
    key_file = tmp_path / "engine-api-key"
    key_file.write_text(keys)
    key_file.chmod(0o600)
    return engine_config.build(
        engine_config.EngineAgentConfig,
        {
            "advertise_address": "127.0.0.1",
            "engine_api_key_file": str(key_file),
            "engines": [{"kind": "simulated", "port": 8001, **engine}],
        },
    )


@pytest.mark.parametrize(
    "engine",
    [{"args": ["--api-key", "x"]}, {"args": ["--api-key=x"]}, {"env": {"VLLM_API_KEY": "x"}}],
)
def test_the_key_is_given_in_engine_api_key_file_only(tmp_path, engine):
    with pytest.raises(ConfigError, match="engine_api_key_file"):
        agent_cfg(tmp_path, "k\n", **engine)


def test_the_supervisor_starts_the_engine_with_the_files_keys_and_remembers_the_probe_key(tmp_path, monkeypatch):
    seen = {}

    async def fake_exec(*cmd, env, **kw):
        seen["cmd"], seen["env"] = list(cmd), env
        raise OSError("not started in this test")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", fake_exec)
    cfg = agent_cfg(tmp_path, "# rotation\nnew-key\nold-key\n")
    proc = supervisor.EngineProcess(cfg.engines[0], cfg, "i")
    with pytest.raises(OSError):
        asyncio.run(proc._spawn())
    assert "--config" in seen["cmd"] and "VLLM_API_KEY" not in seen["env"]
    config = Path(seen["cmd"][seen["cmd"].index("--config") + 1])
    assert json.loads(config.read_text()) == {"api-key": ["new-key", "old-key"]}
    assert not any("new-key" in a or "old-key" in a for a in seen["cmd"])
    Path(cfg.engine_api_key_file).write_text("only-key\n")  # read again at the next start
    proc1 = supervisor.EngineProcess(cfg.engines[0], cfg, "i")
    with pytest.raises(OSError):
        asyncio.run(proc1._spawn())
    assert seen["env"]["VLLM_API_KEY"] == "only-key" and "--config" not in seen["cmd"]
    os.chmod(cfg.engine_api_key_file, 0o644)  # unusable: the engine is not started without its key
    with pytest.raises(OSError, match="every user"):
        asyncio.run(supervisor.EngineProcess(cfg.engines[0], cfg, "i")._spawn())


def test_every_probe_sends_the_engines_key():
    """Failed before: the canary, /v1/models and the rest went without Authorization."""
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization", "")))
        if request.url.path == "/v1/completions":
            return httpx.Response(200, json={"choices": [{"text": "x", "finish_reason": "length"}]})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if request.url.path == "/metrics":
            return httpx.Response(200, text="vllm:num_requests_running 0\nvllm:generation_tokens_total 0\n")
        return httpx.Response(200, json={"version": "x"})

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            probe = EngineProbe("http://engine:8001", client, api_key=lambda: "the-key")
            await probe.health(1)
            await probe.load(1)
            assert (await probe.canary("m", "Hi", 1)).ok
            await probe.identity(1)

    asyncio.run(go())
    assert {p for p, _ in seen} == {"/health", "/metrics", "/v1/completions", "/v1/models", "/version"}
    assert all(auth == "Bearer the-key" for _, auth in seen), seen


def test_a_refused_key_is_said_plainly_by_the_canary():
    async def go():
        transport = httpx.MockTransport(lambda r: httpx.Response(401, json={"error": "Unauthorized"}))
        async with httpx.AsyncClient(transport=transport) as client:
            return await EngineProbe("http://e:1", client).canary("m", "Hi", 1)

    res = asyncio.run(go())
    assert not res.ok and "refused the agent's API key" in res.error
