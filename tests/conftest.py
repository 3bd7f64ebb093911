"""Fixtures shared by every tier: real processes on loopback, started and stopped by the tests."""

from __future__ import annotations

import pytest

from agent.local.consul_dev import ConsulDev


@pytest.fixture(scope="session")
def consul_session():
    """One real `consul agent -dev` for the whole session (tests must use unique service names)."""
    with ConsulDev(node="ernie-test") as c:
        yield c


@pytest.fixture
def consul_fresh(tmp_path):
    """A real Consul dev agent of the test's own (for tests that stop or restart Consul)."""
    c = ConsulDev(node="ernie-test", data_dir=str(tmp_path / "consul"))
    (tmp_path / "consul").mkdir()
    with c:
        yield c
