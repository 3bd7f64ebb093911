"""The client's generation request as the relay sees it (pure).

A request is *resumable* when a continuation from its generated token IDs gives exactly what the
engine would have produced. Features that break that are named here, once: such requests are
still relayed, and if their stream breaks the client gets a clear OpenAI-style error event
instead of a silent cut (docs/gateway.md, "Resuming relay: what resumes exactly").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["chat", "completion"]
ROUTES: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
CONTINUATION_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"  # answered by the relay from its snapshot (every model a passing instance serves)

# Sampling parameters a continuation carries unchanged (vLLM's completion request accepts each).
CARRIED_PARAMS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "priority",
    "user",
)
# Not `truncate_prompt_tokens`: the relayed prompt IDs are already truncated, and truncating them
# with the generated IDs again would drop the start of the context the continuation runs from.


@dataclass(frozen=True)
class RelayRequest:
    kind: Kind
    body: dict[str, Any] = field(repr=False)
    stream: bool
    resumable: bool
    why_not: str  # '' when resumable: the feature that prevents an exact continuation
    include_usage: bool
    client_wants_token_ids: bool
    max_tokens: int | None  # None: up to the model's context
    min_tokens: int

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    def upstream_body(self) -> bytes:
        """What goes to the engine on the first attempt: always a stream (so that where it runs and
        how far it got are known), with the generated token IDs."""
        body = dict(self.body)
        if self.resumable:
            body["stream"] = True
            body["return_token_ids"] = True
            if not self.stream:
                body.pop("stream_options", None)
        return _dumps(body)

    def continuation_body(self, prompt_ids: list[int], generated_ids: list[int]) -> bytes:
        """A /v1/completions request that continues from exactly these tokens."""
        body: dict[str, Any] = {k: self.body[k] for k in CARRIED_PARAMS if k in self.body}
        body.update(model=self.body.get("model"), prompt=prompt_ids + generated_ids, stream=True, return_token_ids=True)
        if self.max_tokens is not None:
            body["max_tokens"] = max(self.max_tokens - len(generated_ids), 0)
        else:
            body["max_tokens"] = None  # vLLM: up to the context (a completion's default is 16)
        if self.min_tokens:
            body["min_tokens"] = max(self.min_tokens - len(generated_ids), 0)
        if self.stream and self.include_usage:
            body["stream_options"] = {"include_usage": True}
        return _dumps(body)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _nonzero(body: dict[str, Any], key: str) -> bool:
    v = body.get(key)
    return v not in (None, 0, 0.0, False)


def _guided_format(body: dict[str, Any]) -> bool:
    rf = body.get("response_format")
    return rf is not None and not (isinstance(rf, dict) and rf.get("type", "text") == "text")


def not_resumable_because(kind: Kind, body: dict[str, Any]) -> str:
    """'' if a continuation from token IDs is exact for this request, else the feature that prevents it."""
    if body.get("n", 1) not in (1, None) or body.get("best_of", 1) not in (1, None):
        return "n > 1"
    if body.get("use_beam_search"):
        return "beam search"
    if kind == "chat":
        if body.get("logprobs") or body.get("top_logprobs"):
            return "logprobs"
        if body.get("tools") or body.get("functions") or body.get("tool_choice") not in (None, "none"):
            return "tool calls"
        if _guided_format(body):
            return "response_format (guided decoding)"
        if body.get("echo"):
            return "echo"
    else:
        if body.get("logprobs") is not None:
            return "logprobs"
        if body.get("echo"):
            return "echo"
        if body.get("suffix"):
            return "suffix"
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
            return "a batch of prompts"
        if _guided_format(body):
            return "response_format (guided decoding)"
    for key in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
        if body.get(key) is not None:
            return "guided decoding"
    for key in ("presence_penalty", "frequency_penalty"):
        if _nonzero(body, key):
            return key.replace("_", " ")  # penalties count output tokens; a continuation sees them as prompt
    if body.get("stop"):
        # vLLM holds back text that may begin a stop string; that text, and a stop string that
        # straddles the splice, would be lost.
        return "stop strings"
    if body.get("prompt_logprobs") is not None:
        return "prompt_logprobs"
    return ""


def parse(kind: Kind, raw: bytes) -> RelayRequest | None:
    """The request, or None when it is not a JSON object (the engine answers it: 400)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    why = not_resumable_because(kind, body)
    opts = body.get("stream_options")
    if kind == "chat":  # as vLLM: max_completion_tokens unless it is null
        max_tokens = body.get("max_completion_tokens")
        max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    else:
        max_tokens = body.get("max_tokens", 16)
    min_tokens = body.get("min_tokens") or 0
    if (
        (max_tokens is not None and not isinstance(max_tokens, int))
        or not isinstance(min_tokens, int)
        or isinstance(max_tokens, bool)
    ):
        why = why or "unusual max_tokens"  # the engine will say what is wrong with it
        max_tokens, min_tokens = None, 0
    return RelayRequest(
        kind=kind,
        body=body,
        stream=bool(body.get("stream")),
        resumable=not why,
        why_not=why,
        include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")),
        client_wants_token_ids=bool(body.get("return_token_ids")),
        max_tokens=max_tokens,
        min_tokens=min_tokens,
    )
