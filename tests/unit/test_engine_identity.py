"""Instance IDs are unique by construction, and an engine agent never takes over a live registration
that another agent owns (issue 12, item 9)."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from agent.catalog.base import CatalogEntry, CheckStatus, Registration, Verdict, VerdictState
from agent.catalog.keeper import OWNER_META, OwnedElsewhere, RegistrationKeeper, foreign_owner
from agent.catalog.memory import MemoryCatalog
from agent.config import ConfigError
from agent.engine import config as engine_config
from agent.engine.cli import check_not_taken
from agent.engine.instance import InstanceController
from agent.engine.metrics import EngineAgentMetrics

OK = Verdict(VerdictState.PASSING, "canary generation ok")


def cfg_of(**data):
    data.setdefault("node", "n1")
    return engine_config.build(engine_config.EngineAgentConfig, data)


# --- unique by construction ---------------------------------------------------------------------


def test_attached_engines_on_two_hosts_with_one_port_get_two_ids():
    """Before: both were ernie-n1-8000 (the ID had the node and the port only); the gateway's
    snapshot kept one of them and `drain` picked the first."""
    cfg = cfg_of(engines=[{"url": "http://10.0.0.1:8000"}, {"url": "http://10.0.0.2:8000"}])
    ids = [cfg.instance_id(e) for e in cfg.engines]
    assert len(set(ids)) == 2, ids


def test_two_hosts_with_one_short_name_get_two_ids():
    """Before: gpu.a.example and gpu.b.example (node `gpu` both) both registered ernie-gpu-8001."""
    ids = [
        (
            c := cfg_of(
                node="gpu", advertise_address=a, engines=[{"kind": "simulated", "port": 8001, "host": "0.0.0.0"}]
            )
        ).instance_id(c.engines[0])
        for a in ("10.0.0.1", "10.0.0.2")
    ]
    assert len(set(ids)) == 2, ids


def test_the_id_is_what_gateways_dial_the_engine_on():
    cfg = cfg_of(
        advertise_address="192.0.2.7",
        engines=[
            {"kind": "simulated", "port": 8001, "host": "0.0.0.0"},
            {"kind": "simulated", "port": 8002, "host": "192.0.2.8"},
            {"url": "http://[2001:db8::1]:8003/v1"},
        ],
    )
    assert [cfg.instance_id(e) for e in cfg.engines] == [
        "ernie-n1-192.0.2.7-8001",
        "ernie-n1-192.0.2.8-8002",
        "ernie-n1-2001:db8::1-8003",
    ]
    c = InstanceController(cfg, cfg.engines[2], MemoryCatalog(), httpx.AsyncClient(), EngineAgentMetrics())
    reg = c.registration()
    assert reg.instance_id == c.id == cfg.instance_id(cfg.engines[2])
    assert (reg.address, reg.port) == ("2001:db8::1", 8003)


# --- the owner ----------------------------------------------------------------------------------


def test_the_owner_is_the_agent_stable_across_restarts_distinct_per_listen_address():
    a = cfg_of(listen="127.0.0.1:9100", engines=[{"kind": "simulated", "port": 8001}])
    again = cfg_of(listen="127.0.0.1:9100", engines=[{"kind": "simulated", "port": 8001}])
    other = cfg_of(listen="127.0.0.1:9101", engines=[{"kind": "simulated", "port": 8001}])
    assert a.agent_id == again.agent_id  # a restarted agent owns what it registered before
    assert a.agent_id != other.agent_id  # a second agent on this host (it cannot share the listen address)
    c = InstanceController(a, a.engines[0], MemoryCatalog(), httpx.AsyncClient(), EngineAgentMetrics())
    assert c.registration().meta[OWNER_META] == a.agent_id


def entry(owner: str | None, status=CheckStatus.PASSING, note="passing (ok): canary generation ok", iid="x-1"):
    meta = {} if owner is None else {OWNER_META: owner}
    return CatalogEntry(iid, "node-a", "10.0.0.1", 8001, status, note, meta)


@pytest.mark.parametrize(
    "entries, foreign",
    [
        ([], False),
        ([entry("me")], False),  # ours (a previous life of this agent)
        ([entry("other")], True),
        ([entry(None)], True),  # no owner: not ours either
        ([entry("other", CheckStatus.WARNING, "draining (draining): drain requested")], True),
        ([entry("other", CheckStatus.CRITICAL, "starting (loading): loading model")], True),  # its agent writes
        ([entry("other", CheckStatus.CRITICAL, "")], True),  # just registered
        ([entry("other", CheckStatus.CRITICAL, "TTL expired")], False),  # its agent is gone
        ([entry("other", CheckStatus.CRITICAL, "TTL expired (last output before timeout follows): passing")], False),
        ([entry("other", iid="x-2")], False),  # another ID
        ([entry("me"), entry("other")], True),  # one on another node too
    ],
)
def test_a_live_registration_owned_by_another_agent_is_foreign(entries, foreign):
    assert (foreign_owner(entries, "x-1", "me") is not None) is foreign


REG = Registration("ernie", "x-1", "10.0.0.1", 8001, meta={OWNER_META: "me"}, ttl_s=9)
THEIRS = Registration("ernie", "x-1", "10.0.0.1", 8001, meta={OWNER_META: "other", "agent_url": "http://h:9"})


def test_the_keeper_refuses_to_overwrite_a_live_registration_of_another_agent():
    cat = MemoryCatalog()
    cat.register(THEIRS, OK)
    k = RegistrationKeeper(cat, "x-1", ttl_s=9)
    with pytest.raises(OwnedElsewhere, match="x-1 is registered .*another engine agent"):
        k.keep(REG, OK, now=0)
    assert cat.local_instances("ernie")["x-1"] == THEIRS and ("register", "x-1") not in cat.writes[1:]
    cat.expire_ttl("x-1")  # the other agent is gone: its TTL expired
    assert k.keep(REG, OK, now=1) == "registered"
    assert cat.local_instances("ernie")["x-1"].meta[OWNER_META] == "me"


def test_the_keeper_takes_back_its_own_registration_at_once():
    cat = MemoryCatalog()
    cat.register(REG, OK)  # what this agent registered before it was restarted
    assert RegistrationKeeper(cat, "x-1", ttl_s=9).keep(REG, OK, now=0) == "registered"


class TwoNodes(MemoryCatalog):
    """This node's agent, and what the catalog shows of another node's."""

    def __init__(self):
        super().__init__()
        self.elsewhere: list[CatalogEntry] = []

    def instances(self, service, index=0, wait_s=0.0):
        idx, entries = super().instances(service, index, wait_s)
        return idx, entries + self.elsewhere


def test_the_keeper_checks_again_before_re_registering_what_consul_lost():
    cat = TwoNodes()
    k = RegistrationKeeper(cat, "x-1", ttl_s=9)
    k.keep(REG, OK, now=0)
    cat.forget_everything()  # this node's Consul restarted...
    cat.elsewhere = [entry("other")]  # ...and meanwhile another node's agent registered the ID
    with pytest.raises(OwnedElsewhere):
        k.keep(REG, Verdict(VerdictState.DRAINING, "x"), now=1)
    assert "x-1" not in cat.local_instances("ernie")


def test_an_id_live_on_another_node_is_refused_too():
    cat = TwoNodes()
    cat.elsewhere = [entry("other")]
    with pytest.raises(OwnedElsewhere, match="node node-a"):
        RegistrationKeeper(cat, "x-1", ttl_s=9).keep(REG, OK, now=0)
    assert cat.writes == []


def test_registrations_without_an_owner_are_kept_as_before():
    """The gateway agent's own registration carries no owner: no read before registering."""
    cat = MemoryCatalog()
    cat.register(THEIRS, OK)
    plain = Registration("ernie", "x-1", "10.0.0.1", 8001)
    assert RegistrationKeeper(cat, "x-1", ttl_s=9).keep(plain, OK, now=0) == "registered"


def test_the_engine_agent_reports_a_refused_takeover_once_and_writes_nothing(caplog):
    cfg = cfg_of(advertise_address="127.0.0.1", engines=[{"url": "http://127.0.0.1:9"}])
    cat = MemoryCatalog()
    c = InstanceController(cfg, cfg.engines[0], cat, httpx.AsyncClient(), EngineAgentMetrics())
    theirs = Registration("ernie", c.id, "127.0.0.1", 9, meta={OWNER_META: "someone else"})
    cat.register(theirs, OK)

    async def scenario():
        return [await c.publish(OK, now=float(i)) for i in range(3)]

    with caplog.at_level(logging.ERROR):
        actions = asyncio.run(scenario())
    assert all(a.startswith("refused") for a in actions), actions
    assert cat.local_instances("ernie")[c.id] == theirs
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "another engine agent" in errors[0] and "someone else" in errors[0], errors


def test_the_agent_refuses_at_start_with_one_line_naming_the_owner():
    cfg = cfg_of(advertise_address="127.0.0.1", engines=[{"url": "http://127.0.0.1:9"}])
    cat = MemoryCatalog()
    iid = cfg.instance_id(cfg.engines[0])
    cat.register(Registration("ernie", iid, "127.0.0.1", 9, meta={OWNER_META: "gpu-b/abc/127.0.0.1:9100"}), OK)
    with pytest.raises(ConfigError) as err:
        check_not_taken(cfg, cat)
    msg = str(err.value)
    assert "\n" not in msg and iid in msg and "gpu-b/abc/127.0.0.1:9100" in msg and "refusing" in msg
    cat.expire_ttl(iid)
    check_not_taken(cfg, cat)  # its agent is gone: ours to take
    cat.available = False
    check_not_taken(cfg, cat)  # Consul not reachable: the first registration checks
