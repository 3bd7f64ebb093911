"""Which processes outlive their agent, the same in every unit that starts them (issue: Envoy died
with its agent under systemd because the gateway units said KillMode=mixed)."""

from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GATEWAY_UNITS = (
    REPO / "deploy/systemd/ernie-gateway.service",
    REPO / "deploy/ansible/roles/ernie_gateway/templates/ernie-gateway.service.j2",
)


def _service_section(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#",))
    parser.optionxform = str  # keep systemd's key case
    parser.read_string(path.read_text())
    return dict(parser["Service"])


def test_gateway_units_let_envoy_and_the_relays_outlive_the_agent_and_reload_it():
    for unit in GATEWAY_UNITS:
        service = _service_section(unit)
        # mixed (or control-group) would SIGKILL Envoy and every stream when the agent crashes
        assert service["KillMode"] == "process", unit
        assert service["ExecReload"] == "/bin/kill -HUP $MAINPID", unit
        assert service["Restart"] == "on-failure", unit


def test_gateway_stop_timeout_covers_the_drain_deadline():
    from agent.gateway.config import GatewayConfig

    plain = _service_section(GATEWAY_UNITS[0])
    assert int(plain["TimeoutStopSec"]) >= GatewayConfig().drain_deadline_s + 30
    templated = _service_section(GATEWAY_UNITS[1])
    assert "ernie_gateway_drain_deadline_s" in templated["TimeoutStopSec"]
