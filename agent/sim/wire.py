"""vLLM 0.32's response shapes, reproduced key for key for the SIMULATED engine.

vLLM dumps stream chunks with `model_dump_json(exclude_unset=True)`: a field its serving code passes
explicitly appears even when None, so `"token_ids":null` is in every chat content chunk and
`"prompt_token_ids":null,"token_ids":null` in every completion chunk when `return_token_ids` is off,
and the chat role chunk always has `"prompt_token_ids"` and `"prompt_text"`. The usage chunk is dumped
with `exclude_none=True`, and non-streaming responses with a plain `model_dump()` (every field).
The last generated token rides in the chunk that carries finish_reason, as in vLLM. The server's
`system_fingerprint` is on non-streaming answers, on the usage chunk, and on the chunk with
finish_reason only when there is no usage chunk.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

from agent.sim.engine import SIM_ENGINE_VERSION
from agent.sim.protocol import GenerationParams

CHAT_CHUNK = "chat.completion.chunk"
TEXT_COMPLETION = "text_completion"
SYSTEM_FINGERPRINT = f"simulated-{SIM_ENGINE_VERSION}"  # vLLM's is vllm-<version>-<config hash>


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def _ids(p: GenerationParams, ids: Sequence[int]) -> list[int] | None:
    return list(ids) if p.return_token_ids else None


def _head(p: GenerationParams, request_id: str, created: int, obj: str) -> dict[str, Any]:
    return {"id": request_id, "object": obj, "created": created, "model": p.model}


def full_response(
    p: GenerationParams, request_id: str, created: int, text: str, token_ids: Sequence[int], finish_reason: str
) -> dict[str, Any]:
    """A non-streaming /v1/chat/completions or /v1/completions answer."""
    full_usage = {
        **usage(p.prompt_tokens, len(token_ids)),
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    prompt_ids = _ids(p, p.prompt.token_ids)
    if p.kind == "chat":
        message = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "reasoning": None,
        }
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "token_ids": _ids(p, token_ids),
            "routed_experts": None,
        }
        return {
            **_head(p, request_id, created, "chat.completion"),
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": full_usage,
            "prompt_logprobs": None,
            "prompt_token_ids": prompt_ids,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    choice = {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": finish_reason,
        "stop_reason": None,
        "token_ids": _ids(p, token_ids),
        "prompt_logprobs": None,
        "prompt_token_ids": prompt_ids,
        "routed_experts": None,
    }
    return {
        **_head(p, request_id, created, TEXT_COMPLETION),
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": full_usage,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def role_chunk(p: GenerationParams, request_id: str, created: int) -> dict[str, Any]:
    """The first chunk of a chat stream: the role, and the prompt's token IDs when asked for."""
    choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    return {
        **_head(p, request_id, created, CHAT_CHUNK),
        "choices": [choice],
        "prompt_token_ids": _ids(p, p.prompt.token_ids),
        "prompt_text": None,
    }


def token_chunk(
    p: GenerationParams,
    request_id: str,
    created: int,
    text: str,
    token_ids: Sequence[int],
    finish_reason: str | None,
    first: bool,
) -> dict[str, Any]:
    """A chunk of generated text; with finish_reason set, the last chunk of the choice. `first`: the first
    chunk of a completion stream, which carries the prompt's token IDs when asked for."""
    if p.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "delta": {"content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        if finish_reason is not None:
            choice["stop_reason"] = None
        choice["token_ids"] = _ids(p, token_ids)
        out = {**_head(p, request_id, created, CHAT_CHUNK), "choices": [choice]}
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "prompt_token_ids": _ids(p, p.prompt.token_ids) if first else None,
            "token_ids": _ids(p, token_ids),
        }
        out = {**_head(p, request_id, created, TEXT_COMPLETION), "choices": [choice]}
    if finish_reason is not None and not p.include_usage:
        out["system_fingerprint"] = SYSTEM_FINGERPRINT
    return out


def usage_chunk(p: GenerationParams, request_id: str, created: int, completion_tokens: int) -> dict[str, Any]:
    obj = CHAT_CHUNK if p.kind == "chat" else TEXT_COMPLETION
    return {
        **_head(p, request_id, created, obj),
        "choices": [],
        "usage": usage(p.prompt_tokens, completion_tokens),
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
