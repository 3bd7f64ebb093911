"""API keys: what one is, where it is kept, and what the edge and the relay are given.

A key is kept in Consul KV under `ernie-mesh/api-keys/<name>` (readable by gateways and
operators only, once ACLs are on) or in a TOML file (`[edge] api_keys = "/path/keys.toml"`,
mode 0600). Envoy's `api_key_auth` filter compares keys in the clear, so the gateway agent
renders them into run_dir/keys/api-keys.yaml (0600, in a 0700 directory) which Envoy watches:
a key added or revoked takes effect in well under a second, without a restart. The relay gets
only names and limits (key-policies.json), never a key.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import ConfigError
from agent.gateway.rendered import private_dir, write_private

KV_PREFIX = "ernie-mesh/api-keys/"
KEY_PREFIX = "sk-ernie-"
NAME_HEADER = "x-ernie-key-name"  # set by Envoy from the key that matched (never the client's)
ENVOY_FILE = "api-keys.yaml"
POLICIES_FILE = "key-policies.json"
FILTER_NAME = "ernie.api_keys"
API_KEY_AUTH_TYPE = "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class BadKey(ConfigError):
    """A malformed key entry (one line, names the entry)."""


@dataclass(frozen=True)
class ApiKey:
    name: str  # in metrics, access logs and the relay's limits
    key: str
    models: tuple[str, ...] = ()  # empty: every model
    requests_per_minute: int = 0  # 0: no limit
    tokens_per_minute: int = 0
    created: str = ""

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise BadKey(f"key name {self.name!r}: letters, digits, '.', '_' or '-' (max 63)")
        if len(self.key) < 20 or any(c.isspace() for c in self.key):
            raise BadKey(f"key {self.name!r}: a key needs at least 20 characters and no spaces")
        if self.requests_per_minute < 0 or self.tokens_per_minute < 0:
            raise BadKey(f"key {self.name!r}: limits must be >= 0")

    @property
    def fingerprint(self) -> str:
        """What `keys list` shows instead of the key: its first characters and a digest."""
        return f"{self.key[:12]}…{hashlib.sha256(self.key.encode()).hexdigest()[:8]}"

    def to_json(self) -> str:
        return json.dumps(
            {
                "key": self.key,
                "models": list(self.models),
                "requests_per_minute": self.requests_per_minute,
                "tokens_per_minute": self.tokens_per_minute,
                "created": self.created,
            }
        )

    def policy(self) -> dict[str, Any]:
        """What the relay needs: everything but the key."""
        return {
            "models": list(self.models),
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
        }


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _from_mapping(name: str, data: Any) -> ApiKey:
    if not isinstance(data, dict) or not isinstance(data.get("key"), str):
        raise BadKey(f"key {name!r}: expected a table with a string `key`")
    models = data.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise BadKey(f"key {name!r}: models must be a list of model names")
    try:
        rpm = int(data.get("requests_per_minute", 0))
        tpm = int(data.get("tokens_per_minute", 0))
    except (TypeError, ValueError):
        raise BadKey(f"key {name!r}: limits must be integers") from None
    return ApiKey(name, data["key"], tuple(models), rpm, tpm, str(data.get("created", "")))


def from_kv(tree: dict[str, str]) -> tuple[list[ApiKey], list[str]]:
    """The keys under KV_PREFIX, and one line per entry that could not be read (skipped)."""
    keys, errors = [], []
    for path, raw in sorted(tree.items()):
        name = path[len(KV_PREFIX) :] if path.startswith(KV_PREFIX) else path
        if not name or "/" in name:
            continue
        try:
            keys.append(_from_mapping(name, json.loads(raw)))
        except (ValueError, BadKey) as e:
            errors.append(f"{path}: {e}")
    return keys, errors


def from_file(path: str) -> list[ApiKey]:
    """A TOML file: one table per key, `[keys.<name>] key = "sk-..."`, optional models and limits."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"api_keys file {path} not found") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"api_keys file {path}: {e}") from None
    table = data.get("keys", {})
    if not isinstance(table, dict):
        raise ConfigError(f"api_keys file {path}: expected [keys.<name>] tables")
    return [_from_mapping(name, entry) for name, entry in sorted(table.items())]


@dataclass(frozen=True)
class KeySet:
    keys: tuple[ApiKey, ...] = field(default_factory=tuple)

    def envoy_resource(self) -> dict[str, Any]:
        """The ECDS resource Envoy's api_key_auth filter reads from the watched file."""
        return {
            "resources": [
                {
                    "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                    "name": FILTER_NAME,
                    "typed_config": auth_config([(k.key, k.name) for k in self.keys]),
                }
            ]
        }

    def policies(self) -> dict[str, Any]:
        return {k.name: k.policy() for k in self.keys}


def auth_config(credentials: list[tuple[str, str]]) -> dict[str, Any]:
    """api_key_auth: `Authorization: Bearer <key>` (the prefix is stripped), the key's name
    forwarded in NAME_HEADER (replacing any the client sent), the key itself not forwarded."""
    return {
        "@type": API_KEY_AUTH_TYPE,
        "credentials": [{"key": key, "client": name} for key, name in credentials],
        "key_sources": [{"header": "authorization"}],
        "forwarding": {"header": NAME_HEADER, "hide_credentials": True},
    }


def write_files(directory: Path, keyset: KeySet) -> bool:
    """Render the key set for Envoy and the relay; True if anything changed."""
    private_dir(directory)
    changed = write_private(directory / POLICIES_FILE, json.dumps(keyset.policies(), sort_keys=True))
    # JSON is YAML; the policies first, so the relay never lacks the policy of a key Envoy accepts
    return write_private(directory / ENVOY_FILE, json.dumps(keyset.envoy_resource(), sort_keys=True)) or changed


def ensure_key(store: Any, name: str, path: Path) -> str:
    """The key `name` of a one-machine mesh: the one saved in `path` (0600) if there is one, else a
    new one saved there; put into the KV store unless it holds it already (a -dev Consul starts empty)."""
    try:
        key = path.read_text().strip()
        ApiKey(name, key)
    except (OSError, BadKey):
        key = new_key()
        write_private(path, key + "\n")
    entry = ApiKey(name, key, created=now_iso())
    _index, tree = store.kv_tree(KV_PREFIX + name)
    held, _errors = from_kv(tree)
    if not any(k.name == name and k.key == key for k in held):
        store.kv_put(KV_PREFIX + name, entry.to_json())
    return key
