"""Registration payload and idempotence, against the in-memory catalog."""

import asyncio
import dataclasses
import time

import httpx

from agent.catalog.base import CatalogUnavailable, Verdict, VerdictState
from agent.catalog.memory import MemoryCatalog
from agent.engine import config as engine_config
from agent.engine.instance import InstanceController
from agent.engine.metrics import EngineAgentMetrics
from agent.engine.probe import Identity

PASS = Verdict(VerdictState.PASSING, "canary generation ok")


def make(argv, catalog):
    cfg = engine_config.load(["--advertise-address", "127.0.0.1", *argv])
    client = httpx.AsyncClient()
    return InstanceController(cfg, cfg.engines[0], catalog, client, EngineAgentMetrics())


def test_payload_has_stable_id_meta_tags_and_ttl_check():
    cat = MemoryCatalog()
    c = make(
        ["--node", "gpu7", "--zone", "rack-2", "--listen", "10.0.0.7:9100", "--engine", "vllm:8001:/models/ernie"], cat
    )
    c.identity = Identity(
        served_model_name="/models/ernie", model="/models/ernie", max_model_len=2048, engine_version="0.32.0"
    )
    reg = c.registration()
    assert reg.service == "ernie"
    assert reg.instance_id == "ernie-gpu7-127.0.0.1-8001"
    assert reg.port == 8001
    assert reg.meta["model"] == "/models/ernie"
    assert reg.meta["served_model_name"] == "/models/ernie"
    assert reg.meta["max_model_len"] == "2048"
    assert reg.meta["engine"] == "vllm"
    assert reg.meta["engine_version"] == "0.32.0"
    assert reg.meta["zone"] == "rack-2"
    assert reg.meta["agent_url"] == "http://10.0.0.7:9100"
    assert "zone=rack-2" in reg.tags and "model=/models/ernie" in reg.tags
    assert reg.ttl_s == 30.0 and reg.deregister_critical_after_s == 1800.0


def test_engine_listening_everywhere_is_registered_on_the_advertised_address():
    cat = MemoryCatalog()
    cfg = engine_config.build(
        engine_config.EngineAgentConfig,
        {
            "node": "n1",
            "advertise_address": "192.0.2.10",
            "engines": [{"kind": "simulated", "port": 8001, "host": "0.0.0.0"}],
        },
    )
    c = InstanceController(cfg, cfg.engines[0], cat, httpx.AsyncClient(), EngineAgentMetrics())
    assert c.registration().address == "192.0.2.10"


def test_publish_is_idempotent_and_survives_consul_losing_everything():
    cat = MemoryCatalog()
    c = make(["--node", "n1", "--engine", "simulated:8001"], cat)

    async def scenario():
        assert await c.publish(PASS, now=0.0) == "registered"
        assert await c.publish(PASS, now=1.0) == "unchanged"  # same verdict
        assert await c.publish(PASS, now=4.0) == "unchanged"  # the TTL is the TTL task's business
        assert await c.publisher.refresh(now=1.5) == "unchanged"  # not due
        assert await c.publisher.refresh(now=4.0) == "verdict pushed"  # TTL refresh (every ttl_refresh_s)
        crit = Verdict(VerdictState.CRITICAL, "hung: x")
        assert await c.publish(crit, now=4.1) == "verdict pushed"  # a change goes out at once
        cat.forget_everything()  # Consul restarted (-dev keeps nothing)
        assert await c.publish(crit, now=9.0) == "unchanged"  # nothing changed as far as the agent knows
        assert await c.publisher.refresh(now=9.0) == "re-registered"  # the TTL task finds out
        cat.available = False
        assert (await c.publish(PASS, now=20.0)).startswith("Consul write failed")
        cat.available = True
        assert await c.publish(PASS, now=20.5) == "verdict pushed"

    asyncio.run(scenario())
    assert list(cat.local_instances("ernie")) == ["ernie-n1-127.0.0.1-8001"]  # never a duplicate
    assert cat.verdict("ernie-n1-127.0.0.1-8001") == PASS
    assert [op for op, _ in cat.writes].count("register") == 2


def test_changed_data_re_registers():
    cat = MemoryCatalog()
    c = make(["--node", "n1", "--engine", "simulated:8001"], cat)

    async def scenario():
        await c.publish(PASS, now=0.0)
        c.identity = Identity(served_model_name="sim-model", model="sim-model", max_model_len=4096)
        assert await c.publish(PASS, now=0.5) == "registered"

    asyncio.run(scenario())
    assert cat.local_instances("ernie")["ernie-n1-127.0.0.1-8001"].meta["max_model_len"] == "4096"


def test_catalog_unavailable_is_a_catalog_error():
    assert issubclass(CatalogUnavailable, Exception)


class SlowCatalog(MemoryCatalog):
    """A Consul whose critical-verdict writes take a while (a slow agent, a GC pause)."""

    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s = delay_s

    def set_verdict(self, instance_id, verdict):
        if verdict.state is VerdictState.CRITICAL:
            time.sleep(self.delay_s)
        super().set_verdict(instance_id, verdict)


def test_a_verdict_in_flight_during_the_drain_does_not_resurrect_the_instance():
    """Before: _drain deregistered while a set_verdict was still in flight on another thread; it
    landed afterwards, got NotRegistered and re-registered the instance (a ghost)."""
    cat = SlowCatalog(delay_s=1.0)
    cfg = engine_config.load(
        ["--node", "n1", "--advertise-address", "127.0.0.1", "--engine", "attach:http://127.0.0.1:9"]
    )
    cfg = dataclasses.replace(cfg, drain_quiet_s=0.01, drain_deadline_s=0.2)
    c = InstanceController(cfg, cfg.engines[0], cat, httpx.AsyncClient(), EngineAgentMetrics())

    async def scenario():
        assert await c.publish(PASS, now=0.0) == "registered"
        in_flight = asyncio.create_task(c.publish(Verdict(VerdictState.CRITICAL, "x"), now=1.0))
        await asyncio.sleep(0.1)  # the slow write is on its way
        await c.start_drain()
        await in_flight
        await asyncio.sleep(0.2)

    asyncio.run(scenario())
    assert cat.local_instances("ernie") == {}, cat.writes
    assert cat.writes[-1][0] == "deregister", cat.writes  # nothing written after the deregistration
