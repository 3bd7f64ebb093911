"""Server-sent events as vLLM writes them (`data: {json}\n\n`, `data: [DONE]\n\n`): framing and the
few facts the relay reads from each event without decoding its JSON. Pure functions.

The hot path of a relayed stream is: split the bytes into events, take the token-ID fields the
relay asked for out of the event (replacing them with the `null` vLLM writes when they were not
asked for, so the client sees exactly what it would have seen), look for a finish reason, forward.
"""

from __future__ import annotations

import re
from typing import NamedTuple

EVENT_END = b"\n\n"
DONE = b"data: [DONE]"
DATA_PREFIX = b"data: "

# `"prompt_token_ids":[1,2]` / `"token_ids":[3]` (the leading quote keeps one from matching inside
# the other). vLLM writes compact JSON (pydantic model_dump_json), no spaces.
_IDS = re.compile(rb'"(prompt_token_ids|token_ids)":\[([0-9,]*)\]')
_FINISH = re.compile(rb'"finish_reason":"([a-z_]+)"')


class EventSplitter:
    """Feed bytes as they arrive; get back complete events (without the blank-line terminator)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        if EVENT_END not in buf:
            self._buf = buf
            return []
        parts = buf.split(EVENT_END)
        self._buf = parts.pop()
        return [p for p in parts if p]

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not ended (what a broken stream leaves behind)."""
        return self._buf


class TokenFields(NamedTuple):
    prompt: bytes | None  # raw "1,2,3" of prompt_token_ids, if the event carried them
    generated: bytes | None  # raw "4,5" of token_ids


_PROMPT_KEY = b'"prompt_token_ids":['
_GENERATED_KEY = b'"token_ids":['  # never matches inside the prompt key (an underscore precedes it there)


def _cut(event: bytes, key: bytes) -> tuple[bytes, bytes | None]:
    """`key[...]` -> `key-without-bracket null`, and the list's raw content. A quote inside a JSON
    string is escaped (\\"), so the key cannot match inside the generated text."""
    i = event.find(key)
    if i < 0:
        return event, None
    start = i + len(key)
    end = event.find(b"]", start)
    if end < 0:
        return event, None
    return event[:i] + key[:-1] + b"null" + event[end + 1 :], event[start:end]


def take_token_ids(event: bytes) -> tuple[bytes, TokenFields]:
    """The event with its token-ID lists replaced by null, and the lists it carried (raw). This runs
    for every relayed event: plain byte searches, no regular expression, no JSON."""
    prompt = None
    if _PROMPT_KEY in event:  # the first event only
        event, prompt = _cut(event, _PROMPT_KEY)
    event, generated = _cut(event, _GENERATED_KEY)
    return event, TokenFields(prompt, generated)


def peek_token_ids(event: bytes) -> TokenFields:
    """The token-ID lists an event carries, leaving it as it is (the client asked for them)."""
    found = {m.group(1): m.group(2) for m in _IDS.finditer(event)}
    return TokenFields(found.get(b"prompt_token_ids"), found.get(b"token_ids"))


def finish_reason(event: bytes) -> str | None:
    m = _FINISH.search(event)
    return m.group(1).decode() if m else None


def is_done(event: bytes) -> bool:
    return event.strip() == DONE


def is_error(event: bytes) -> bool:
    """A mid-stream error event (`data: {"error": {...}}`; vLLM writes one when generation fails)."""
    return event.startswith(b'data: {"error"') or event.startswith(b'data: {"object":"error"')


def is_usage_only(event: bytes) -> bool:
    """The trailing usage chunk of `stream_options.include_usage` (no choices)."""
    return b'"choices":[]' in event


def parse_ids(raw: bytes | None) -> list[int]:
    return [int(x) for x in raw.split(b",") if x] if raw else []


def count_ids(raw: bytes | None) -> int:
    return raw.count(b",") + 1 if raw else 0


def event(payload: bytes) -> bytes:
    return DATA_PREFIX + payload + EVENT_END
