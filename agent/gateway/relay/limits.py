"""Per-key limits in the relay: the models a key may use, requests and tokens per minute.

The gateway agent renders each key's limits into keys_dir/key-policies.json (names, never keys);
Envoy has checked the key and names it in x-ernie-key-name. Counts are kept per second for the
last 60 s in keys_dir/usage.json, which the relay processes of one gateway share (each update
under an exclusive lock), so a limit holds for the gateway as a whole. Gateways do not share
counts: with N gateways behind one name a key may use up to N times its limit.

Requests are counted when admitted; tokens (prompt + completion, from the usage the relay
computes) when a request ends — a request that starts under the limit finishes even if it takes
the key over it; the next one waits.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

WINDOW_S = 60


@dataclass(frozen=True)
class Policy:
    models: tuple[str, ...] = ()
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @property
    def limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)


NO_POLICY = Policy()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    kind: str = ""  # what ran out: "requests" | "tokens"
    retry_after_s: int = 0
    headers: tuple[tuple[str, str], ...] = ()  # x-ratelimit-* (OpenAI's names)


class Policies:
    """keys_dir/key-policies.json, re-read when it changes (its mtime and size, looked at on every request)."""

    def __init__(self, path: Path):
        self.path = path
        self._by_name: dict[str, Policy] = {}
        self._stamp: tuple[float, int] | None = None

    def of(self, name: str) -> Policy:
        # one stat per request (about a microsecond): a key's new limits apply to its next request
        self._reload()
        return self._by_name.get(name, NO_POLICY)

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._by_name, self._stamp = {}, None
            return
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # being replaced: keep the previous policies, read again next time
        self._stamp = stamp
        self._by_name = {
            name: Policy(
                tuple(p.get("models") or ()),
                int(p.get("requests_per_minute") or 0),
                int(p.get("tokens_per_minute") or 0),
            )
            for name, p in data.items()
            if isinstance(p, dict)
        }


class UsageWindows:
    """Requests and tokens per key and second over the last minute, shared through a locked file."""

    def __init__(self, path: Path, wall: Callable[[], float] = time.time):
        self.path = path
        self.wall = wall

    def admit(self, name: str, policy: Policy) -> Decision:
        """Count one request of `name` if its limits allow it."""
        now = int(self.wall())

        def step(data: dict[str, Any]) -> Decision:
            buckets = data.setdefault(name, {})
            requests = sum(b[0] for b in buckets.values())
            tokens = sum(b[1] for b in buckets.values())
            rpm, tpm = policy.requests_per_minute, policy.tokens_per_minute
            kind = ""
            if rpm and requests >= rpm:
                kind = "requests"
            elif tpm and tokens >= tpm:
                kind = "tokens"
            retry = _seconds_until_room(buckets, now, 0 if kind == "requests" else 1) if kind else 0
            if not kind:
                bucket = buckets.setdefault(str(now), [0, 0])
                bucket[0] += 1
                requests += 1
            headers = _headers(rpm, requests, tpm, tokens, buckets, now)
            if kind:
                headers += (("retry-after", str(retry)),)
            return Decision(not kind, kind, retry, headers)

        return self._update(now, step)

    def record_tokens(self, name: str, tokens: int) -> None:
        if tokens <= 0:
            return
        now = int(self.wall())

        def step(data: dict[str, Any]) -> None:
            data.setdefault(name, {}).setdefault(str(now), [0, 0])[1] += tokens

        self._update(now, step)

    def _update(self, now: int, step: Callable[[dict[str, Any]], T]) -> T:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                data = json.loads(f.read() or "{}")
            except ValueError:
                data = {}
            for key in list(data):
                data[key] = {s: b for s, b in data[key].items() if int(s) > now - WINDOW_S}
                if not data[key]:
                    del data[key]
            result = step(data)
            f.seek(0)
            f.truncate()
            f.write(json.dumps(data, separators=(",", ":")))
            return result


def _seconds_until_room(buckets: dict[str, list[int]], now: int, index: int) -> int:
    """When the oldest counted second leaves the window (at least 1 s)."""
    seconds = sorted(int(s) for s, b in buckets.items() if b[index])
    return max(1, (seconds[0] + WINDOW_S - now) if seconds else 1)


def _headers(
    rpm: int, requests: int, tpm: int, tokens: int, buckets: dict[str, list[int]], now: int
) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    if rpm:
        out += [
            ("x-ratelimit-limit-requests", str(rpm)),
            ("x-ratelimit-remaining-requests", str(max(rpm - requests, 0))),
            ("x-ratelimit-reset-requests", f"{_seconds_until_room(buckets, now, 0)}s"),
        ]
    if tpm:
        out += [
            ("x-ratelimit-limit-tokens", str(tpm)),
            ("x-ratelimit-remaining-tokens", str(max(tpm - tokens, 0))),
            ("x-ratelimit-reset-tokens", f"{_seconds_until_room(buckets, now, 1)}s"),
        ]
    return tuple(out)


class KeyLimits:
    """What the relay asks: the policy of a key, and whether a request of it may start."""

    def __init__(self, keys_dir: str):
        from agent.gateway.keys import POLICIES_FILE

        self.policies = Policies(Path(keys_dir) / POLICIES_FILE)
        self.windows = UsageWindows(Path(keys_dir) / "usage.json")

    def policy(self, name: str) -> Policy:
        return self.policies.of(name) if name else NO_POLICY
