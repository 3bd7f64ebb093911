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
