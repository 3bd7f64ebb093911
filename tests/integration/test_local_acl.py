"""The local mesh's Consul ACLs (agent/local/consul_acl.py) on a real Consul dev agent: default
deny, and each role's token can do what its part needs and nothing more."""

from __future__ import annotations

import httpx
import pytest

from agent.catalog.base import CatalogError, Registration, Verdict, VerdictState
from agent.catalog.consul import ConsulCatalog
from agent.gateway.keys import KV_PREFIX
from agent.local.binaries import consul_binary
from agent.local.consul_acl import LocalAcl, consul_version
from agent.local.consul_dev import ConsulDev
from agent.naming import GATEWAY_SERVICE

PASSING = Verdict(VerdictState.PASSING)


@pytest.fixture(scope="module")
def consul(tmp_path_factory):
    root = tmp_path_factory.mktemp("local-acl")
    acl = LocalAcl(root / "consul-tokens")
    acl.create_secrets()
    config = root / "consul-acl.json"
    config.write_text(acl.agent_config(consul_version(consul_binary())))
    (root / "consul").mkdir()
    with ConsulDev(data_dir=str(root / "consul"), config_file=str(config)) as c:
        acl.bootstrap(c.address, "ernie")
        yield c, acl


def reg(service: str, iid: str) -> Registration:
    return Registration(service, iid, "127.0.0.1", 9999, ttl_s=60, deregister_critical_after_s=120)


def test_without_a_token_nothing_registers_and_no_key_is_read_but_the_catalog_is(consul):
    c, acl = consul
    management = ConsulCatalog(c.address, token_file=str(acl.path("management")))
    assert management.kv_put(KV_PREFIX + "carol", '{"key": "sk-secret"}')  # something to leak
    anonymous = ConsulCatalog(c.address)
    with pytest.raises(CatalogError, match="403|ermission"):
        anonymous.register(reg("ernie", "ernie-intruder"), PASSING)
    r = httpx.get(f"{c.url}/v1/kv/{KV_PREFIX}?recurse")
    assert r.status_code in (403, 404) and b"carol" not in r.content  # values are base64: look for the key
    assert b"carol" not in httpx.get(f"{c.url}/v1/kv/?keys").content
    assert httpx.get(f"{c.url}/v1/health/service/ernie").status_code == 200  # DNS, status, Prometheus


def test_the_engine_token_registers_engines_only(consul):
    c, acl = consul
    engine = ConsulCatalog(c.address, token_file=str(acl.path("engine")))
    engine.register(reg("ernie", "ernie-e1"), PASSING)
    engine.set_verdict("ernie-e1", Verdict(VerdictState.DRAINING, "test"))
    with pytest.raises(CatalogError, match="403|ermission"):
        engine.register(reg(GATEWAY_SERVICE, "ernie-gateway-fake"), PASSING)
    with pytest.raises(CatalogError, match="403|ermission"):
        engine.kv_put(KV_PREFIX + "stolen", "x")


def test_the_gateway_token_reads_keys_and_registers_the_gateway_the_operator_writes_keys(consul):
    c, acl = consul
    operator = ConsulCatalog(c.address, token_file=str(acl.path("operator")))
    gateway = ConsulCatalog(c.address, token_file=str(acl.path("gateway")))
    assert operator.kv_put(KV_PREFIX + "alice", '{"key": "sk-test"}')
    _index, tree = gateway.kv_tree(KV_PREFIX)
    assert KV_PREFIX + "alice" in tree
    with pytest.raises(CatalogError, match="403|ermission"):
        gateway.kv_put(KV_PREFIX + "mallory", "x")
    gateway.register(reg(GATEWAY_SERVICE, "ernie-gateway-gw1"), PASSING)
    with pytest.raises(CatalogError, match="403|ermission"):
        gateway.register(reg("ernie", "ernie-fake"), PASSING)
    with pytest.raises(CatalogError, match="403|ermission"):
        operator.register(reg("ernie", "ernie-fake"), PASSING)
