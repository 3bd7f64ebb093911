"""The Consul boundary: one Catalog protocol, one Consul implementation, one in-memory one."""

from agent.catalog.base import (
    Catalog,
    CatalogEntry,
    CatalogError,
    CatalogUnavailable,
    CheckStatus,
    NotRegistered,
    Registration,
    Verdict,
    VerdictCause,
    VerdictState,
)

__all__ = [
    "Catalog",
    "CatalogEntry",
    "CatalogError",
    "CatalogUnavailable",
    "CheckStatus",
    "NotRegistered",
    "Registration",
    "Verdict",
    "VerdictCause",
    "VerdictState",
]
