"""The two-datacenter inventory (deploy/ansible/inventory.multidc.example.yml), checked by rendering,
not by deploying: the netns Ansible test (tests/integration/test_ansible_deploy.py) deploys one
datacenter; here the consul role's config for every host of two (show-consul-config.yml, nothing
installed, a few seconds), `ansible-playbook --syntax-check`, and the filters it uses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_ansible_filters import load

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "ansible"
INVENTORY = ANSIBLE_DIR / "inventory.multidc.example.yml"
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
DC1_SERVERS = ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
DC2_SERVERS = ["10.1.0.11", "10.1.0.12", "10.1.0.13"]
SECRETS = {
    name: f"secret-{name}"
    for name in (
        "vault_consul_encrypt_key",
        "vault_consul_acl_management_token",
        "vault_consul_acl_agent_token",
        "vault_consul_acl_dns_token",
        "vault_consul_acl_replication_token",
        "vault_ernie_engine_consul_token",
        "vault_ernie_gateway_consul_token",
        "vault_ernie_prometheus_consul_token",
        "vault_ernie_engine_api_key",
        "vault_ernie_gateway_api_key",
    )
}


def _env() -> dict[str, str]:
    return {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_LOCAL_TEMP": "/tmp"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict]:
    """host -> what show-consul-config.yml printed for it (the default callback, results as JSON)."""
    extra = tmp_path_factory.mktemp("multidc") / "secrets.json"
    extra.write_text(json.dumps(SECRETS))
    out = subprocess.run(
        [str(PLAYBOOK), "-i", str(INVENTORY), "show-consul-config.yml", "-e", f"@{extra}"],
        cwd=ANSIBLE_DIR,
        env={**_env(), "ANSIBLE_CALLBACK_RESULT_FORMAT": "json", "ANSIBLE_NOCOLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    shown = {}
    for block in re.finditer(r"^ok: \[([^\]]+)\] => (\{.*?^\})$", out.stdout, re.M | re.S):
        shown[block[1]] = json.loads(block[2])["msg"]
    assert len(shown) == 11, out.stdout[-3000:]
    return shown


def test_each_datacenters_servers_join_each_other_and_the_others_over_the_wan(rendered):
    for host, dc, lan, wan in (
        ("consul1", "dc1", DC1_SERVERS, DC2_SERVERS),
        ("consul5", "dc2", DC2_SERVERS, DC1_SERVERS),
    ):
        c = rendered[host]["config"]
        assert (c["datacenter"], c["server"], c["bootstrap_expect"]) == (dc, True, 3), host
        assert c["retry_join"] == lan and c["retry_join_wan"] == wan, host
    for host, dc, lan in (("gpu1", "dc1", DC1_SERVERS), ("gpu3", "dc2", DC2_SERVERS), ("gw2", "dc2", DC2_SERVERS)):
        c = rendered[host]["config"]
        assert (c["datacenter"], c["server"], c["retry_join"]) == (dc, False, lan), host
        assert "retry_join_wan" not in c and "bootstrap_expect" not in c, host


def test_acls_are_the_primarys_and_replicated_to_the_other_datacenter_with_one_gossip_key(rendered):
    assert {r["config"]["primary_datacenter"] for r in rendered.values()} == {"dc1"}
    assert {r["config"]["encrypt"] for r in rendered.values()} == {"secret-vault_consul_encrypt_key"}
    assert rendered["consul1"]["datacenters"] == ["dc1", "dc2"]
    # dc2's servers replicate tokens (with the replication token); dc1's and every client do not
    assert rendered["consul4"]["config"]["acl"]["enable_token_replication"] is True
    assert "replication" in rendered["consul4"]["acl_tokens"]
    for host in ("consul1", "gpu1", "gpu3", "gw2"):
        assert rendered[host]["config"]["acl"]["enable_token_replication"] is False, host
        assert "replication" not in rendered[host]["acl_tokens"], host
    # TLS: every server's certificate names its own datacenter (server.<dc>.consul)
    ernie = load("ernie")
    hostvars = {"consul4": {"consul_datacenter": "dc2", "ernie_host_address": "10.1.0.11"}}
    assert ernie.ernie_server_spec("consul4", hostvars) == "consul4=10.1.0.11@dc2"


def test_the_site_playbook_parses_with_the_two_datacenter_inventory():
    out = subprocess.run(
        [str(PLAYBOOK), "-i", str(INVENTORY), "site.yml", "--syntax-check"],
        cwd=ANSIBLE_DIR,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_datacenter_filters_and_the_prepared_query():
    ernie = load("ernie")
    hostvars = {"s1": {}, "s2": {"consul_datacenter": "dc2"}, "s3": {"consul_datacenter": "dc1"}}
    servers = ["s1", "s2", "s3"]
    assert ernie.ernie_datacenters(servers, hostvars) == ["dc1", "dc2"]  # s1: the role's default, dc1
    assert ernie.ernie_dc_servers(servers, hostvars, "dc1") == ["s1", "s3"]
    q = ernie.ernie_prepared_query("ernie", "dc2", ["dc1", "dc2", "dc3"])
    assert q["Name"] == "ernie" and q["Service"]["Service"] == "ernie" and q["Service"]["OnlyPassing"] is True
    assert q["Service"]["Failover"] == {"NearestN": 2, "Datacenters": ["dc1", "dc3"]}
    assert ernie.ernie_prepared_query("ernie", "dc1", ["dc1"])["Service"]["Failover"] == {
        "NearestN": 0,
        "Datacenters": [],
    }
    # what Consul answers for the one-datacenter query (null, not []) is no difference: a re-run changes nothing
    consul_has = {
        "ID": "x",
        "Name": "ernie",
        "Service": {"Service": "ernie", "OnlyPassing": True, "Failover": {"NearestN": 0, "Datacenters": None}},
        "DNS": {"TTL": "0s"},
    }
    assert not ernie.ernie_prepared_query_differs(consul_has, ernie.ernie_prepared_query("ernie", "dc1", ["dc1"]))
    assert ernie.ernie_prepared_query_differs(consul_has, q)
