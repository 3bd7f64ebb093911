"""API keys: parsing, what Envoy and the relay are given, and the watch that keeps them current."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent.catalog.base import CatalogUnavailable
from agent.config import ConfigError
from agent.gateway import keys
from agent.gateway.keys_watch import KeysWatch

KEY_A = "sk-ernie-aaaaaaaaaaaaaaaaaaaaaaaa"
KEY_B = "sk-ernie-bbbbbbbbbbbbbbbbbbbbbbbb"


class FakeKV:
    def __init__(self) -> None:
        self.tree: dict[str, str] = {}
        self.index = 1
        self.down = False

    def kv_tree(self, prefix: str, index: int = 0, wait_s: float = 0.0) -> tuple[int, dict[str, str]]:
        if self.down:
            raise CatalogUnavailable("Consul unreachable")
        return self.index, {k: v for k, v in self.tree.items() if k.startswith(prefix)}

    def kv_put(self, key: str, value: str, only_if_absent: bool = False) -> bool:
        if only_if_absent and key in self.tree:
            return False
        self.tree[key] = value
        self.index += 1
        return True

    def kv_delete(self, key: str) -> None:
        self.tree.pop(key, None)
        self.index += 1


def envoy_credentials(directory: Path) -> dict[str, str]:
    doc = json.loads((directory / keys.ENVOY_FILE).read_text())
    [resource] = doc["resources"]
    assert resource["name"] == keys.FILTER_NAME
    return {c["client"]: c["key"] for c in resource["typed_config"]["credentials"]}


def test_a_key_round_trips_through_kv_and_list_never_shows_it():
    k = keys.ApiKey("alice", KEY_A, ("ernie-4.5",), 600, 100_000, "2026-12-01T00:00:00Z")
    [back], errors = keys.from_kv({keys.KV_PREFIX + "alice": k.to_json()})
    assert back == k and errors == []
    assert KEY_A not in k.fingerprint and k.fingerprint.startswith(KEY_A[:12])
    assert KEY_A not in json.dumps(k.policy())


@pytest.mark.parametrize(
    "name,key", [("bad name", KEY_A), ("alice", "short"), ("alice", "sk-ernie-with space in it xx"), ("", KEY_A)]
)
def test_bad_names_and_keys_are_refused(name, key):
    with pytest.raises(keys.BadKey):
        keys.ApiKey(name, key)


def test_a_malformed_kv_entry_is_skipped_with_a_reason_and_the_others_stay():
    good = keys.ApiKey("alice", KEY_A).to_json()
    found, errors = keys.from_kv({keys.KV_PREFIX + "alice": good, keys.KV_PREFIX + "bob": "{not json"})
    assert [k.name for k in found] == ["alice"]
    assert len(errors) == 1 and "bob" in errors[0]


def test_files_are_private_and_the_relay_gets_no_key(tmp_path):
    d = tmp_path / "keys"
    assert keys.write_files(d, keys.KeySet((keys.ApiKey("alice", KEY_A, requests_per_minute=5),)))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for f in (keys.ENVOY_FILE, keys.POLICIES_FILE):
        assert stat.S_IMODE(os.stat(d / f).st_mode) == 0o600
    assert envoy_credentials(d) == {"alice": KEY_A}
    policies = (d / keys.POLICIES_FILE).read_text()
    assert KEY_A not in policies and json.loads(policies)["alice"]["requests_per_minute"] == 5
    assert not keys.write_files(d, keys.KeySet((keys.ApiKey("alice", KEY_A, requests_per_minute=5),)))


def test_the_watch_follows_kv_and_keeps_the_last_keys_when_consul_is_away(tmp_path):
    kv = FakeKV()
    kv.kv_put(keys.KV_PREFIX + "alice", keys.ApiKey("alice", KEY_A).to_json())
    loads: list[int] = []
    w = KeysWatch(tmp_path, store=kv, on_load=loads.append)
    w.prepare()
    assert envoy_credentials(tmp_path) == {"alice": KEY_A}
    kv.kv_put(keys.KV_PREFIX + "bob", keys.ApiKey("bob", KEY_B).to_json())
    kv.kv_delete(keys.KV_PREFIX + "alice")
    assert w.load_once(wait=True)
    assert envoy_credentials(tmp_path) == {"bob": KEY_B}
    kv.down = True
    with pytest.raises(CatalogUnavailable):
        w.load_once(wait=True)
    assert envoy_credentials(tmp_path) == {"bob": KEY_B}  # nothing revoked or granted by an outage
    assert loads == [1, 1]


def test_first_start_without_consul_accepts_no_key(tmp_path):
    kv = FakeKV()
    kv.down = True
    KeysWatch(tmp_path, store=kv).prepare()
    assert envoy_credentials(tmp_path) == {}


def test_a_keys_file_is_read_and_a_bad_one_is_one_line(tmp_path):
    f = tmp_path / "keys.toml"
    f.write_text(f'[keys.alice]\nkey = "{KEY_A}"\nmodels = ["m1"]\n')
    w = KeysWatch(tmp_path / "out", file=str(f))
    w.prepare()
    assert envoy_credentials(tmp_path / "out") == {"alice": KEY_A}
    f.write_text('[keys.alice]\nkey = "short"\n')
    with pytest.raises(ConfigError, match="alice"):
        w.load_once()
    assert envoy_credentials(tmp_path / "out") == {"alice": KEY_A}


def test_ensure_key_reuses_the_saved_key_and_fills_an_empty_consul(tmp_path):
    kv = FakeKV()
    path = tmp_path / "api-key"
    first = keys.ensure_key(kv, "local", path)
    assert first.startswith(keys.KEY_PREFIX) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    fresh = FakeKV()  # a -dev Consul comes back empty
    assert keys.ensure_key(fresh, "local", path) == first
    [held], _ = keys.from_kv(fresh.tree)
    assert held.key == first
