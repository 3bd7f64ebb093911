"""The one registration keeper both agents use (agent/catalog/keeper.py): writes only what is needed."""

from __future__ import annotations

import pytest

from agent.catalog.base import CatalogUnavailable, Registration, Verdict, VerdictState
from agent.catalog.keeper import UNCHANGED, RegistrationKeeper
from agent.catalog.memory import MemoryCatalog

REG = Registration("ernie", "ernie-n-8001", "10.0.0.1", 8001, ttl_s=9)
OK = Verdict(VerdictState.PASSING, "canary generation ok")
DRAINING = Verdict(VerdictState.DRAINING, "drain requested")


def test_registers_once_then_writes_only_changes_and_ttl_refreshes():
    cat = MemoryCatalog()
    k = RegistrationKeeper(cat, REG.instance_id, ttl_s=9)
    assert k.keep(REG, OK, now=0) == "registered"
    assert k.keep(REG, OK, now=1) == UNCHANGED
    assert k.keep(REG, OK, now=2.9, refresh=True) == UNCHANGED  # ttl/3 = 3 s not yet passed
    assert k.keep(REG, OK, now=3.1, refresh=False) == UNCHANGED  # the caller does not allow a refresh
    assert k.keep(REG, OK, now=3.1, refresh=True) == "verdict pushed"
    assert k.keep(REG, DRAINING, now=3.2, refresh=False) == "verdict pushed"
    assert cat.writes == [("register", REG.instance_id), ("verdict", REG.instance_id), ("verdict", REG.instance_id)]
    assert cat.verdict(REG.instance_id) == DRAINING


def test_a_changed_registration_is_registered_again():
    cat = MemoryCatalog()
    k = RegistrationKeeper(cat, REG.instance_id, ttl_s=9)
    k.keep(REG, OK, now=0)
    moved = Registration("ernie", REG.instance_id, "10.0.0.2", 8001, ttl_s=9)
    assert k.keep(moved, OK, now=1) == "registered"


def test_consul_that_lost_the_instance_gets_it_back():
    cat = MemoryCatalog()
    k = RegistrationKeeper(cat, REG.instance_id, ttl_s=9)
    k.keep(REG, OK, now=0)
    cat.forget_everything()  # a restarted -dev Consul
    assert k.keep(REG, DRAINING, now=1) == "re-registered"
    assert cat.verdict(REG.instance_id) == DRAINING


def test_a_failed_write_is_retried_by_the_next_call():
    cat = MemoryCatalog()
    k = RegistrationKeeper(cat, REG.instance_id, ttl_s=9)
    k.keep(REG, OK, now=0)
    cat.available = False
    with pytest.raises(CatalogUnavailable):
        k.keep(REG, DRAINING, now=1)
    assert k.ok is False
    cat.available = True
    assert k.keep(REG, DRAINING, now=1.5, refresh=False) == "verdict pushed"
    assert k.ok is True
    assert k.keep(REG, DRAINING, now=1.6, refresh=False) == UNCHANGED


def test_after_forget_the_next_keep_registers_afresh():
    cat = MemoryCatalog()
    k = RegistrationKeeper(cat, REG.instance_id, ttl_s=9)
    k.keep(REG, OK, now=0)
    cat.deregister(REG.instance_id)
    k.forget()
    assert k.keep(REG, OK, now=1) == "registered"


def test_a_new_consul_token_re_registers_with_it_and_the_use_is_counted():
    """Token rotation: the local Consul agent keeps the token each service was registered with for
    its anti-entropy, so a new token must be registered with again (same ID: no catalog gap)."""
    from agent.catalog.token_use import token_use

    cat = MemoryCatalog()
    cat.token_accessor = "old-accessor"
    k = RegistrationKeeper(cat, REG.instance_id, ttl_s=9)
    assert token_use(cat, [k]) == {}  # nothing written yet
    k.keep(REG, OK, now=0)
    assert token_use(cat, [k]) == {"old-accessor": 1}
    cat.token_generation, cat.token_accessor = 1, "new-accessor"
    assert token_use(cat, [k]) == {"stale": 1}  # written with the old token, not yet again
    assert k.keep(REG, OK, now=0.5, refresh=False) == "registered with the new Consul token"
    assert cat.writes[-1] == ("register", REG.instance_id)
    assert cat.verdict(REG.instance_id) == OK
    assert token_use(cat, [k]) == {"new-accessor": 1}
    assert k.keep(REG, OK, now=0.6, refresh=False) == UNCHANGED
