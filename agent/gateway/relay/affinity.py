"""The affinity key of a request: requests that share it go to the same instance, where their prefix
is already in vLLM's prefix cache (pure).

Envoy hashes the key (header x-ernie-affinity) onto its table of instances (Maglev, bounded
load: agent/gateway/bootstrap.py); every gateway builds the same table from the same snapshot, so
every gateway makes the same choice with no shared state. The recipe (docs/gateway.md, Routing):

1. the client names a session: its session header (x-session-id by default), else the OpenAI
   `user` field;
2. otherwise the start of the prompt: for chat, the system messages ("system", the default: every
   conversation with one system prompt together, so each engine caches few system prompts;
   spilled by the load bound when one is hot), or, for a chat without one and with
   "conversation", the messages up to and including the first user message (every turn of a
   conversation repeats them, so it goes where the first went); for completions, the first
   `prefix_chars` characters of the prompt.

A resumed stream (the relay's continuation) stays near its key too: `rank` orders the instances by
rendezvous hashing, the same order in every relay and gateway.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

KEYS = ("conversation", "system")
AFFINITY_HEADER = "x-ernie-affinity"  # what Envoy's Maglev table hashes (the engine hop's hash policy)


@dataclass(frozen=True)
class AffinityRecipe:
    key: str = "system"  # KEYS
    session_header: str = "x-session-id"
    prefix_chars: int = 4096  # of a completion's prompt (or a message's content) that the key reads


def affinity_key(
    recipe: AffinityRecipe, kind: str, body: Mapping[str, Any], headers: Mapping[str, str], tenant: str = ""
) -> str:
    """The key ('' when the request has nothing to key on: Envoy then picks any instance). A session
    or user name is the client's own: it is scoped by `tenant` (the API key's name), so that two
    tenants' "session 1" are two keys."""
    session = headers.get(recipe.session_header, "").strip()
    if session:
        return _digest("session", tenant, session)
    user = body.get("user")
    if isinstance(user, str) and user:
        return _digest("user", tenant, user)
    model = str(body.get("model", ""))
    if kind == "chat":
        start = _conversation_start(body.get("messages"), recipe)
        return _digest("chat", model, start) if start else ""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return _digest("prompt", model, prompt[: recipe.prefix_chars])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return _digest("ids", model, json.dumps(prompt[: recipe.prefix_chars // 4]))
    return ""


def _conversation_start(messages: object, recipe: AffinityRecipe) -> str:
    if not isinstance(messages, list):
        return ""
    start = []
    for m in messages:
        if not isinstance(m, dict):
            return ""
        role = m.get("role")
        start.append([role, _text(m.get("content"))[: recipe.prefix_chars]])
        if role == "user":
            break
    if recipe.key == "system":
        system = [m for m in start if m[0] in ("system", "developer")]
        start = system or start  # a chat without a system prompt keys on its start
    return json.dumps(start, separators=(",", ":"), ensure_ascii=False) if start else ""


def _text(content: object) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _digest(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def rank(key: str, instances: Iterable[str]) -> list[str]:
    """Instances in rendezvous order for key (highest random weight first): removing one moves
    only the keys it ranked first, and every process computes the same order."""
    return sorted(
        instances, key=lambda i: hashlib.blake2b(f"{key}\0{i}".encode(), digest_size=8).digest(), reverse=True
    )
