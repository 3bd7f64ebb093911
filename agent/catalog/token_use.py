"""Which ACL token each registration an agent keeps was last written with: what a token rotation
(deploy/ansible/rotate-tokens.yml) waits for before it deletes the old token.

Exported by both agents as `ernie_consul_token_registrations{accessor}`: the number of their
registrations written with the token of that AccessorID (not a secret: `consul acl token list`
shows it); "stale" counts those still written with an earlier token (re-registered within a TTL
refresh), "unknown" those written while Consul could not name the token (ACLs off, unreachable)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.catalog.base import Catalog
from agent.catalog.keeper import RegistrationKeeper, catalog_token_generation

METRIC = "ernie_consul_token_registrations"


def token_use(catalog: Catalog, keepers: Iterable[RegistrationKeeper]) -> dict[str, int]:
    """{accessor | "stale" | "unknown": registrations written with it}."""
    generation = catalog_token_generation(catalog)
    out: dict[str, int] = {}
    for k in keepers:
        if k.registered is None:
            continue
        if k.token_generation != generation:
            label = "stale"
        else:
            label = str(getattr(catalog, "token_accessor", "")) or "unknown"
        out[label] = out.get(label, 0) + 1
    return out


class TokenUseCollector(Collector):
    def __init__(self, catalog: Catalog, keepers: Callable[[], Iterable[RegistrationKeeper]]):
        self.catalog = catalog
        self.keepers = keepers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            METRIC,
            "Registrations this agent keeps in Consul, by the AccessorID of the ACL token they were "
            "last written with (stale: an earlier token, re-registered within a TTL refresh)",
            labels=["accessor"],
        )
        for accessor, n in sorted(token_use(self.catalog, self.keepers()).items()):
            g.add_metric([accessor], n)
        yield g
