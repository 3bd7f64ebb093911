"""The engine agent's secrets, with a real Consul and simulated engines (issue 11, items 2 and 7)."""

from __future__ import annotations

from pathlib import Path

from agent.local.ports import free_port
from tests.integration.engine_support import EngineAgent

SERVICE = "ernie-it-secrets"
CONSUL_TOKEN = "consul-token-0123456789abcdef"  # a dev Consul without ACLs ignores it


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_the_agents_consul_token_reaches_neither_the_engine_nor_its_command_line(consul_session, tmp_path):
    """Failed before: the simulated engine's environment held CONSUL_HTTP_TOKEN."""
    port = free_port()
    agent = EngineAgent(
        tmp_path,
        consul_session.address,
        SERVICE,
        engines=[{"kind": "simulated", "port": port}],
        env={"CONSUL_HTTP_TOKEN": CONSUL_TOKEN},
    )
    iid = agent.instance_id(port)
    with agent:
        agent.wait_state(iid, "passing", timeout_s=60)  # the agent itself uses the token
        assert environ(agent.proc.proc.pid)["CONSUL_HTTP_TOKEN"] == CONSUL_TOKEN
        pid = agent.instances()[iid]["pid"]
        engine_env = environ(pid)
        assert "CONSUL_HTTP_TOKEN" not in engine_env and "ERNIE_MESH_CONTROL_TOKEN_FILE" not in engine_env
        assert CONSUL_TOKEN not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    logs = [agent.proc.log_path, *(tmp_path / "logs").glob("*.log")]
    assert all(CONSUL_TOKEN not in Path(p).read_text(errors="replace") for p in logs)


# --- engines behind their own key (issue 11, item 2) ---------------------------------------------

OLD_KEY, NEW_KEY = "engine-key-old-0123456789", "engine-key-new-9876543210"


def private(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def test_engines_behind_their_own_key_through_the_gateway(consul_session, tmp_path):
    """An engine started with the key refuses requests without it; the agent's canary passes; through
    the gateway every route works and no client sees the key or can choose what the engines get;
    the gateway switching to the next key (the engine accepting both, as during a rotation) loses
    nothing. Failed before: engine_api_key_file did not exist (the canary could not send a key)."""
    import threading

    import httpx

    from tests.integration.gateway_support import AUTH, Gateway, wait_until

    port = free_port()
    agent = EngineAgent(
        tmp_path,
        consul_session.address,
        SERVICE,
        node="keyed",
        engines=[{"kind": "simulated", "port": port, "served_model_name": "sim-model"}],
        engine_api_key_file=private(tmp_path / "engine-keys", f"{OLD_KEY}\n{NEW_KEY}\n"),  # a rotation under way
    )
    iid = agent.instance_id(port)
    gw_keys = tmp_path / "gateway-engine-key"
    gw_conf = tmp_path / "gateway.toml"
    gw_conf.write_text(f'engine_api_key_file = "{private(gw_keys, OLD_KEY + chr(10))}"\n')
    gateways = [
        Gateway(consul_session.address, SERVICE, tmp_path / "gw", "gw-keyed", ("--config", str(gw_conf))),
        Gateway(
            consul_session.address,
            SERVICE,
            tmp_path / "gw-open",
            "gw-open",
            ("--config", str(gw_conf), "--api-keys", "off"),
        ),
    ]
    engine = f"http://127.0.0.1:{port}"
    with agent:
        agent.wait_state(iid, "passing", timeout_s=60)  # its canary sent the key
        pid = agent.instances()[iid]["pid"]
        assert OLD_KEY not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        body = {"model": "sim-model", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{engine}/v1/completions", json=body, timeout=5).status_code == 401
        for key in (OLD_KEY, NEW_KEY):  # both, as the key file lists them
            r = httpx.post(f"{engine}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        try:
            for gw in gateways:
                gw.start()
            keyed, open_ = gateways
            wait_until(lambda: keyed.endpoints().get(iid) == "healthy", 20, "the instance routed")
            wait_until(lambda: open_.endpoints().get(iid) == "healthy", 20, "the instance routed")
            chat = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            with httpx.Client(timeout=10) as c:
                answers = [
                    c.get(f"{keyed.url}/v1/models", headers=AUTH),
                    c.post(f"{keyed.url}/v1/chat/completions", json=chat, headers=AUTH),  # the relay's path
                    c.post(f"{keyed.url}/v1/completions", json={**body, "stream": True}, headers=AUTH),
                    # with api_keys off a client's Authorization passes the edge: it is overwritten
                    c.post(f"{open_.url}/v1/chat/completions", json=chat, headers={"Authorization": "Bearer x"}),
                    c.get(f"{open_.url}/v1/models", headers={"Authorization": "Bearer x"}),
                ]
                for r in answers:
                    assert r.status_code == 200, (r.request.url, r.text)
                    seen = r.text + "".join(f"{k}: {v}" for k, v in r.headers.items())
                    assert OLD_KEY not in seen and NEW_KEY not in seen
                # the engine key is no API key at the edge
                r = c.get(f"{keyed.url}/v1/models", headers={"Authorization": f"Bearer {OLD_KEY}"})
                assert r.status_code == 401

                failures: list[object] = []
                done: list[float] = []
                stop = threading.Event()

                def load() -> None:
                    with httpx.Client(timeout=10) as lc:
                        while not stop.is_set():
                            r = lc.post(f"{keyed.url}/v1/chat/completions", json=chat, headers=AUTH)
                            (done if r.status_code == 200 else failures).append(r.status_code)

                sender = threading.Thread(target=load, daemon=True)
                sender.start()
                wait_until(lambda: len(done) >= 5, 20, "requests answered before the switch")
                private(gw_keys, NEW_KEY + "\n")  # the rotation's second step: gateways send the new key
                sds = tmp_path / "gw" / "engine-credential" / "engine-credential.yaml"
                wait_until(lambda: NEW_KEY in sds.read_text(), 10, "the gateway rendering the new key")
                switched = len(done)
                wait_until(lambda: len(done) >= switched + 10, 30, "requests answered after the switch")
                stop.set()
                sender.join(15)
                assert failures == [], failures
            dump = httpx.get(f"http://127.0.0.1:{keyed.admin_port}/config_dump?include_eds", timeout=10).text
            assert "credential_injector" in dump and OLD_KEY not in dump and NEW_KEY not in dump  # redacted
        finally:
            for gw in gateways:
                gw.cleanup()
