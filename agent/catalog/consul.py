"""Catalog backed by a real Consul agent (python-consul2). The only module that imports `consul`.

Transport and API errors are converted here into the small exception tree of catalog.base.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import consul
import msgspec
import requests

from agent.catalog.base import (
    CatalogEntry,
    CatalogError,
    CatalogUnavailable,
    CheckStatus,
    NotRegistered,
    Registration,
    Verdict,
)
from agent.durations import go_duration

if TYPE_CHECKING:
    from agent.config import ConsulConfig

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 5.0
# A whole-service read that timed out is retried with twice the time, up to this: Consul's answer
# grows with the fleet (~26 MiB at 10,000 instances), and a busy Consul can take longer than
# HTTP_TIMEOUT_S to produce it; a timeout that never lets it finish would keep the gateway blind.
# After a read that succeeded the time is twice what it took (at least HTTP_TIMEOUT_S): it follows
# the fleet's size, and a hung Consul is noticed as soon as a fast one allows.
MAX_READ_TIMEOUT_S = 60.0
# Consul adds up to wait/16 of jitter to a blocking query; leave room for it.
BLOCKING_SLACK_S = 5.0


def check_id(instance_id: str) -> str:
    return f"service:{instance_id}"


_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$")


def split_address(address: str, default_port: int = 8500) -> tuple[str, str, int]:
    """'http://host:8500' | 'host:8500' | 'host' -> (scheme, host, port); ValueError if malformed."""
    scheme, rest = "http", address
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        if scheme not in ("http", "https"):
            raise ValueError(f"{address!r}: scheme must be http or https")
    rest = rest.rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or rest.endswith("]"):
        host, port = rest, str(default_port)
    if not _HOST_RE.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: expected HOST[:PORT] or http(s)://HOST[:PORT]")
    return scheme, host.strip("[]"), int(port)


_ENV_LOCK = threading.Lock()


def _consul_client(**kwargs: Any) -> consul.Consul:
    """python-consul2 lets CONSUL_HTTP_ADDR override the host and port it is given (and fails on
    addresses without a port): the address we pass has already taken that variable into account."""
    with _ENV_LOCK:
        saved = os.environ.pop("CONSUL_HTTP_ADDR", None)
        try:
            return consul.Consul(**kwargs)
        finally:
            if saved is not None:
                os.environ["CONSUL_HTTP_ADDR"] = saved


class ConsulCatalog:
    """Catalog on top of the Consul HTTP API (agent/service, agent/check, health).

    The ACL token is `token`, or the first line of `token_file` (CONSUL_HTTP_TOKEN_FILE), which
    is re-read whenever it changes (one stat before each call): a rotated token is used from the
    next call on, without a restart. `token_generation` counts the tokens read; the registration
    keeper re-registers what it wrote with an older one, so the local Consul agent's anti-entropy
    uses the new token too (it keeps the token each service was registered with)."""

    def __init__(
        self,
        address: str = "127.0.0.1:8500",
        token: str | None = None,
        token_file: str = "",
        ca_file: str = "",
        datacenter: str = "",
    ):
        scheme, host, port = split_address(address)
        self.address = f"{scheme}://{host}:{port}"
        # "" : the local agent's datacenter; another: reads are forwarded there (WAN federation, ?dc=)
        self.datacenter = datacenter
        self._token = token or None
        self._token_file = "" if self._token else token_file
        self._token_stamp: tuple[int, int, int] | None = None
        self._token_lock = threading.Lock()
        self._generation = 0
        self._accessor: tuple[int, str] | None = None  # (generation, AccessorID) of the token in use
        self._verify: bool | str = ca_file or True
        if self._token_file:
            self._reload_token(initial=True)
        self._client = self._new_client(HTTP_TIMEOUT_S)
        self._clients_by_timeout: dict[float, consul.Consul] = {}
        self._decoders: dict[str, HealthDecoder] = {}
        self._read_timeout: dict[str, float] = {}  # service -> the non-blocking read's timeout

    @classmethod
    def for_config(cls, c: ConsulConfig, datacenter: str = "") -> ConsulCatalog:
        return cls(c.address, c.token, token_file=c.token_file, ca_file=c.ca_file, datacenter=datacenter)

    @classmethod
    def from_env(cls, address: str) -> ConsulCatalog:
        """The CLI commands' catalog: the token from CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE."""
        return cls(
            address,
            os.environ.get("CONSUL_HTTP_TOKEN"),
            token_file=os.environ.get("CONSUL_HTTP_TOKEN_FILE", ""),
            ca_file=os.environ.get("CONSUL_CACERT", ""),
        )

    def _new_client(self, timeout: float) -> consul.Consul:
        scheme, host, port = split_address(self.address)
        client = _consul_client(
            host=host,
            port=port,
            scheme=scheme,
            token=self._token,
            timeout=timeout,
            verify=self._verify,
            dc=self.datacenter or None,
        )
        client.token = self._token  # python-consul2 lets CONSUL_HTTP_TOKEN win over the one it is given
        return client

    # --- the token -----------------------------------------------------------------------------

    @property
    def token_generation(self) -> int:
        """How many tokens this catalog has used (0: one, never changed); re-reads token_file."""
        self._refresh_token()
        return self._generation

    @property
    def token_accessor(self) -> str:
        """The AccessorID of the token in use (what `consul acl token list` shows; not a secret), or
        "" when Consul cannot say (no token, ACLs disabled, unreachable: asked again next time)."""
        generation = self.token_generation
        if self._accessor is not None and self._accessor[0] == generation:
            return self._accessor[1]
        if not self._token:
            return ""
        try:
            info = self._client.acl.self()
        except (consul.ConsulException, requests.RequestException):
            return ""
        accessor = str((info or {}).get("AccessorID", ""))
        self._accessor = (generation, accessor)
        return accessor

    def _refresh_token(self) -> None:
        if not self._token_file:
            return
        try:
            st = os.stat(self._token_file)
        except OSError:
            return  # kept: the last token read (a file being replaced, or gone: logged on read)
        if (st.st_mtime_ns, st.st_size, st.st_ino) != self._token_stamp:
            self._reload_token()

    def _reload_token(self, initial: bool = False) -> None:
        from agent.config import ConfigError
        from agent.secret_files import read_secret

        with self._token_lock:
            try:
                st = os.stat(self._token_file)
                token = read_secret(self._token_file, "consul.token_file")
            except ConfigError as e:
                if initial:
                    raise
                log.warning("%s; still using the token read before", e)
                return
            except OSError:
                return
            self._token_stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if token == self._token:
                return
            changed = self._token is not None
            self._token = token
            if changed:
                self._generation += 1
                for client in (getattr(self, "_client", None), *getattr(self, "_clients_by_timeout", {}).values()):
                    if client is not None:
                        client.token = token
                log.info("Consul token changed (%s re-read): using the new one from now on", self._token_file)

    def _blocking_client(self, wait_s: float) -> consul.Consul:
        timeout = round(wait_s + wait_s / 16 + BLOCKING_SLACK_S, 1)
        client = self._clients_by_timeout.get(timeout)
        if client is None:
            client = self._new_client(timeout)
            self._clients_by_timeout[timeout] = client
        return client

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._refresh_token()
        try:
            return fn(*args, **kwargs)
        except consul.NotFound as e:
            raise NotRegistered(f"{what}: {e}") from e
        except (requests.ConnectionError, requests.Timeout) as e:
            raise CatalogUnavailable(f"{what}: Consul at {self.address} unreachable ({type(e).__name__})") from e
        except consul.ConsulException as e:
            text = str(e)
            # Consul 1.x answers a TTL update for an unknown check with 404/500 "Unknown check".
            if "nknown check" in text or "does not have associated TTL" in text:
                raise NotRegistered(f"{what}: {text}") from e
            if text[:1] == "5":
                raise CatalogUnavailable(f"{what}: {text}") from e
            raise CatalogError(f"{what}: {text}") from e
        except requests.RequestException as e:
            raise CatalogUnavailable(f"{what}: {e}") from e

    # --- writes (engine agent) -------------------------------------------------------------

    def register(self, reg: Registration, verdict: Verdict) -> None:
        check = {
            "CheckID": check_id(reg.instance_id),
            "Name": f"ernie-mesh verdict for {reg.instance_id}",
            "TTL": go_duration(reg.ttl_s, min_ms=1),
            "DeregisterCriticalServiceAfter": go_duration(reg.deregister_critical_after_s, min_ms=1),
            "Status": verdict.check_status.value,
        }
        self._call(
            f"register {reg.instance_id}",
            self._client.agent.service.register,
            reg.service,
            service_id=reg.instance_id,
            address=reg.address,
            port=reg.port,
            tags=list(reg.tags),
            meta=dict(reg.meta),
            check=check,
        )
        self.set_verdict(reg.instance_id, verdict)

    def set_verdict(self, instance_id: str, verdict: Verdict) -> None:
        update = {
            CheckStatus.PASSING: self._client.agent.check.ttl_pass,
            CheckStatus.WARNING: self._client.agent.check.ttl_warn,
            CheckStatus.CRITICAL: self._client.agent.check.ttl_fail,
        }[verdict.check_status]
        ok = self._call(f"verdict {instance_id}", update, check_id(instance_id), notes=verdict.note)
        if ok is False:
            raise NotRegistered(f"verdict {instance_id}: check {check_id(instance_id)} unknown")

    def deregister(self, instance_id: str) -> None:
        self._call(f"deregister {instance_id}", self._client.agent.service.deregister, instance_id)

    def local_instances(self, service: str) -> dict[str, Registration]:
        services = self._call("list local services", self._client.agent.services)
        out: dict[str, Registration] = {}
        for sid, svc in (services or {}).items():
            if svc.get("Service") != service:
                continue
            out[sid] = Registration(
                service=service,
                instance_id=sid,
                address=svc.get("Address", ""),
                port=int(svc.get("Port", 0)),
                meta=dict(svc.get("Meta") or {}),
                tags=tuple(svc.get("Tags") or ()),
            )
        return out

    # --- reads (gateway, status) -------------------------------------------------------------

    def instances(self, service: str, index: int = 0, wait_s: float = 0.0) -> tuple[int, list[CatalogEntry]]:
        """The service's instances with their checks, read `stale`: whichever server the local agent
        asks answers from its own state (as Consul's DNS does by default), so the read works while
        the cluster has no leader and never waits on a forward to a leader that stopped answering
        (a blocking query parked there saw no change until the dead leader was reaped: ~20 s in the
        consul-leader-cut drill). A follower lags the leader by its replication delay (ms).

        Consul answers with the whole service every time (O(fleet) bytes); HealthDecoder decodes
        only the instances whose part of the answer changed, and an unchanged answer not at all.
        Instances that did not change are the same CatalogEntry objects as in the previous read."""
        if wait_s > 0 and index > 0:
            client = self._blocking_client(wait_s)
            new_index, body = self._call(
                f"watch {service}", _health_service_stale, client, service, index, go_duration(wait_s, min_ms=1)
            )
        else:
            timeout = self._read_timeout.get(service, HTTP_TIMEOUT_S)
            started = time.monotonic()
            try:
                new_index, body = self._call(
                    f"read {service}", _health_service_stale, self._client, service, read_timeout_s=timeout
                )
            except CatalogUnavailable as e:
                if isinstance(e.__cause__, requests.Timeout):
                    self._read_timeout[service] = min(timeout * 2, MAX_READ_TIMEOUT_S)
                raise
            took = time.monotonic() - started
            self._read_timeout[service] = min(max(HTTP_TIMEOUT_S, 2 * took), MAX_READ_TIMEOUT_S)
        decoder = self._decoders.get(service)
        if decoder is None:
            decoder = self._decoders.setdefault(service, HealthDecoder())
        try:
            entries = decoder.decode(body)
        except (msgspec.DecodeError, ValueError, TypeError, AttributeError) as e:
            raise CatalogError(f"read {service}: Consul's answer is not a list of service nodes ({e})") from e
        return new_index, entries

    def leader(self) -> str:
        return self._call("status leader", self._client.status.leader) or ""

    def local_datacenter(self) -> str:
        """The datacenter of the Consul agent this catalog talks to."""
        info = self._call("agent self", self._client.agent.self) or {}
        return str((info.get("Config") or {}).get("Datacenter", ""))

    def datacenters(self) -> list[str]:
        """Every datacenter this agent's servers know (WAN federation), nearest first (by Consul's
        round-trip estimate)."""
        return [str(d) for d in self._call("catalog datacenters", self._client.catalog.datacenters) or ()]

    # --- KV (API keys) -----------------------------------------------------------------------

    def kv_tree(self, prefix: str, index: int = 0, wait_s: float = 0.0) -> tuple[int, dict[str, str]]:
        client = self._blocking_client(wait_s) if wait_s > 0 and index > 0 else self._client
        kwargs: dict[str, Any] = {"recurse": True}
        if wait_s > 0 and index > 0:
            kwargs.update(index=index, wait=go_duration(wait_s, min_ms=1))
        new_index, items = self._call(f"read {prefix}", client.kv.get, prefix, **kwargs)
        out = {}
        for item in items or ():
            raw = item.get("Value")
            out[item["Key"]] = raw.decode(errors="replace") if isinstance(raw, bytes) else (raw or "")
        return int(new_index or 0), out

    def kv_put(self, key: str, value: str, only_if_absent: bool = False) -> bool:
        cas = 0 if only_if_absent else None
        return bool(self._call(f"write {key}", self._client.kv.put, key, value, cas=cas))

    def kv_delete(self, key: str) -> None:
        self._call(f"delete {key}", self._client.kv.delete, key)


def _health_service_stale(
    client: consul.Consul, service: str, index: int = 0, wait: str = "", read_timeout_s: float | None = None
) -> tuple[int, bytes]:
    """/v1/health/service/<service>?stale -> (X-Consul-Index, the raw body): python-consul2's
    health.service without a consistency mode (it has none) and without decoding the body to text
    and JSON (HealthDecoder does what is needed of that), with the client's token and datacenter as
    it sends them."""
    params: list[tuple[str, object]] = [("stale", "1")]
    if index:
        params.append(("index", index))
        if wait:
            params.append(("wait", wait))
    if client.dc:
        params.append(("dc", client.dc))
    headers = {"X-Consul-Token": client.token} if client.token else {}
    http = client.http
    r = http.session.get(
        http.uri(f"/v1/health/service/{service}", params),
        headers=headers,
        verify=http.verify,
        cert=http.cert,
        timeout=http.timeout if read_timeout_s is None else (min(http.timeout, HTTP_TIMEOUT_S), read_timeout_s),
    )
    if r.status_code == 404:
        raise consul.NotFound(r.text)
    if r.status_code == 403:
        raise consul.ACLPermissionDenied(r.text)
    if r.status_code >= 400:
        raise consul.ConsulException(f"{r.status_code} {r.text}")
    return int(r.headers.get("X-Consul-Index") or 0), r.content


class HealthDecoder:
    """One service's /v1/health/service answers -> CatalogEntry lists, decoding only what changed.

    An answer byte-for-byte equal to the previous one is the previous list, not decoded at all. Any
    other is only split into its elements (msgspec.Raw: a scan, no objects built); an element whose
    bytes appeared in the previous answer keeps its CatalogEntry (the same object), and only the
    others are decoded. Consul's element for an instance carries the Raft indexes of its service and
    checks, so an instance whose registration or check changed has different bytes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._body = b""
        self._entries: list[CatalogEntry] = []
        self._by_bytes: dict[bytes, CatalogEntry] = {}
        self.decoded = 0  # elements decoded so far (the rest were reused)

    def decode(self, body: bytes) -> list[CatalogEntry]:
        with self._lock:
            if body == self._body:
                return list(self._entries)
            known, fresh, out = self._by_bytes, {}, []
            for raw in _SPLIT.decode(body) if body.strip() != b"null" else ():
                blob = bytes(raw)
                entry = known.get(blob)
                if entry is None:
                    entry = _entry(msgspec.json.decode(blob))
                    self.decoded += 1
                fresh[blob] = entry
                out.append(entry)
            self._body, self._entries, self._by_bytes = body, out, fresh
            return list(out)


_SPLIT = msgspec.json.Decoder(list[msgspec.Raw])


def _entry(node: dict[str, Any]) -> CatalogEntry:
    svc = node.get("Service") or {}
    checks = node.get("Checks") or []
    node_info = node.get("Node") or {}
    # The aggregate status is the worst of the node's and the service's checks (what DNS uses);
    # the note is the service check's output unless a node check is what makes it worse.
    order = {CheckStatus.PASSING: 0, CheckStatus.WARNING: 1, CheckStatus.CRITICAL: 2}

    def status_of(chk: dict[str, Any]) -> CheckStatus:
        try:
            return CheckStatus(chk.get("Status", "critical"))
        except ValueError:
            return CheckStatus.CRITICAL

    own = [c for c in checks if c.get("ServiceID") == svc.get("ID")]
    other = [c for c in checks if c.get("ServiceID") != svc.get("ID")]
    status = max((status_of(c) for c in own), key=order.__getitem__, default=CheckStatus.CRITICAL)
    note = next((c.get("Output", "") for c in own), "")
    for chk in other:
        if order[status_of(chk)] > order[status]:
            status = status_of(chk)
            note = f"{chk.get('Name', 'node check')}: {chk.get('Output', '')}".strip()
    return CatalogEntry(
        instance_id=svc.get("ID", ""),
        node=node_info.get("Node", ""),
        address=svc.get("Address") or node_info.get("Address", ""),
        port=int(svc.get("Port", 0)),
        status=status,
        note=note,
        meta=dict(svc.get("Meta") or {}),
        tags=tuple(svc.get("Tags") or ()),
        datacenter=str(node_info.get("Datacenter", "")),
    )
