"""What the relay has sent a client so far, and how a continuation is put in the client's shape (pure).

Attempt 0 runs the client's own request (forced to a stream with token IDs): its events are
forwarded as they are, token-ID fields the client did not ask for turned back into the `null` vLLM
writes by default. A continuation is a /v1/completions request whose prompt is the first attempt's
prompt token IDs followed by every generated token ID relayed so far; its events are rewritten in
the client's shape (chat chunk or completion chunk) with the first attempt's `id`, `created` and
`model`, so the client sees one stream. Usage, when asked for, is counted by the relay after a
resume: the prompt once, every completion token. The final chunk names every instance that served
(`ernie_instances`).

Memory per request: the raw token-ID slices (a few bytes per token), the prompt IDs once, and for
a non-streaming client the text it will be sent; bounded by the model's context length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agent.gateway.relay import sse
from agent.gateway.relay.request import RelayRequest

INSTANCES_FIELD = "ernie_instances"
SPLICES_FIELD = "ernie_splices"  # for each continuation: how many completion tokens came before it


class Signal:
    NONE = ""
    FINISH = "finish"  # the chunk with the finish reason was seen
    DONE = "done"  # data: [DONE]
    ABORT = "abort"  # vLLM's finish_reason "abort" (SIGTERM, drain deadline)
    ERROR = "error"  # a mid-stream error event


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Transcript:
    req: RelayRequest
    id: str = ""
    created: int = 0
    model: str = ""
    prompt_raw: bytes | None = None
    generated_raw: list[bytes] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)
    splices: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None
    text: list[str] = field(default_factory=list)  # non-streaming clients only
    resumes: int = 0
    upstream_usage: bytes | None = None  # the engine's usage chunk (used as is when nothing was resumed)
    first_headers: dict[str, str] = field(default_factory=dict)  # the first engine's response headers

    # --- facts -----------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """The first attempt told us its prompt: a continuation can start from here."""
        return self.prompt_raw is not None

    def prompt_ids(self) -> list[int]:
        return sse.parse_ids(self.prompt_raw)

    def generated_ids(self) -> list[int]:
        return [i for raw in self.generated_raw for i in sse.parse_ids(raw)]

    def generated_count(self) -> int:
        return sum(sse.count_ids(raw) for raw in self.generated_raw)

    def continuation(self) -> bytes:
        return self.req.continuation_body(self.prompt_ids(), self.generated_ids())

    def served_by(self, instance: str) -> None:
        if self.instances and self.started:
            self.splices.append(self.generated_count())
        if not self.instances or self.instances[-1] != instance or self.started:
            self.instances.append(instance)

    # --- attempt 0: the client's own request ----------------------------------------------------

    def native(self, ev: bytes) -> tuple[bytes | None, str]:
        """One event of the first attempt -> (bytes for a streaming client or None, signal). The hot path."""
        if not ev.startswith(b'data: {"id"'):  # vLLM's chunks start with their id: anything else is rare
            if sse.is_done(ev):
                return None, Signal.DONE
            if sse.is_error(ev):
                return None, Signal.ERROR
        if self.req.client_wants_token_ids:
            out, ids = ev, sse.peek_token_ids(ev)
        else:
            out, ids = sse.take_token_ids(ev)
        if ids.prompt is not None and self.prompt_raw is None:
            self.prompt_raw = ids.prompt
        if ids.generated:
            self.generated_raw.append(ids.generated)
        if not self.id:
            self._learn_identity(ev)
        if sse.is_usage_only(ev):
            self.upstream_usage = out
            return None, Signal.NONE
        reason = sse.finish_reason(ev)
        if not self.req.stream:
            self._collect(ev)
        if reason == "abort":
            if not ids.generated:
                return None, Signal.ABORT
            # keep the tokens the abort chunk carries; the finish is the continuation's to give
            return out.replace(b'"finish_reason":"abort"', b'"finish_reason":null'), Signal.ABORT
        if reason is not None:
            self.finish_reason = reason
            return self._name_instances(out), Signal.FINISH
        return out, Signal.NONE

    def _learn_identity(self, ev: bytes) -> None:
        try:
            obj = json.loads(ev[len(sse.DATA_PREFIX) :])
        except ValueError:
            return
        self.id, self.created, self.model = obj.get("id", ""), obj.get("created", 0), obj.get("model", "")

    def _name_instances(self, ev: bytes) -> bytes:
        if not ev.endswith(b"}"):
            return ev
        return ev[:-1] + b',"' + INSTANCES_FIELD.encode() + b'":' + _dumps(self.instances) + b"}"

    def _provenance(self, obj: dict[str, Any]) -> None:
        obj[INSTANCES_FIELD] = self.instances
        if self.splices:
            obj[SPLICES_FIELD] = self.splices

    # --- continuations ----------------------------------------------------------------------

    def continued(self, ev: bytes) -> tuple[bytes | None, str]:
        """One event of a continuation (/v1/completions shape) -> client-shaped bytes or None, signal."""
        if sse.is_done(ev):
            return None, Signal.DONE
        if sse.is_error(ev):
            return None, Signal.ERROR
        try:
            obj = json.loads(ev[len(sse.DATA_PREFIX) :])
        except ValueError:
            return None, Signal.ERROR
        choices = obj.get("choices") or []
        if not choices:
            return None, Signal.NONE  # the continuation's own usage chunk: the relay counts usage itself
        choice = choices[0]
        text = choice.get("text") or ""
        ids = choice.get("token_ids") or []
        reason = choice.get("finish_reason")
        if ids:
            self.generated_raw.append(",".join(map(str, ids)).encode())
        if not self.req.stream:
            self.text.append(text)
        if reason == "abort":
            reason = None
            signal = Signal.ABORT
        else:
            signal = Signal.FINISH if reason else Signal.NONE
        if reason:
            self.finish_reason, self.stop_reason = reason, choice.get("stop_reason")
        if not self.req.stream or (not text and not ids and not reason):
            return None, signal
        return self._client_chunk(text, ids, reason, choice.get("stop_reason")), signal

    def _client_chunk(self, text: str, ids: list[int], reason: str | None, stop_reason: Any) -> bytes:
        token_ids = ids if self.req.client_wants_token_ids else None
        if self.req.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": reason,
                "token_ids": token_ids,
            }
            obj: dict[str, Any] = {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [choice],
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "token_ids": token_ids}
            obj = {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [choice],
            }
        if reason:
            choice["stop_reason"] = stop_reason
            self._provenance(obj)
        return sse.DATA_PREFIX + _dumps(obj)

    # --- the end --------------------------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        prompt = sse.count_ids(self.prompt_raw)
        completion = self.generated_count()
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}

    def closing_events(self) -> list[bytes]:
        """After the finish chunk: the usage chunk (if asked) and [DONE]."""
        out = []
        if self.req.include_usage:
            if self.resumes == 0 and self.upstream_usage is not None:
                out.append(self.upstream_usage)
            else:
                obj: dict[str, Any] = {
                    "id": self.id,
                    "object": "chat.completion.chunk" if self.req.kind == "chat" else "text_completion",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": self.usage(),
                }
                out.append(sse.DATA_PREFIX + _dumps(obj))
        out.append(sse.DONE)
        return out

    def _collect(self, ev: bytes) -> None:
        try:
            obj = json.loads(ev[len(sse.DATA_PREFIX) :])
        except ValueError:
            return
        for choice in obj.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if self.req.kind == "chat" else choice.get("text")
            if piece:
                self.text.append(piece)
            if choice.get("finish_reason") and choice.get("finish_reason") != "abort":
                self.stop_reason = choice.get("stop_reason")

    def response(self) -> bytes:
        """The non-streaming response, assembled the way vLLM writes it."""
        text = "".join(self.text)
        reason = self.finish_reason or "stop"
        choice: dict[str, Any]
        if self.req.kind == "chat":
            choice = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning_content": None,
                },
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": self.stop_reason,
            }
            obj: dict[str, Any] = {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [choice],
                "service_tier": None,
                "system_fingerprint": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": self.stop_reason,
                "prompt_logprobs": None,
            }
            obj = {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [choice],
                "service_tier": None,
                "system_fingerprint": None,
            }
        if self.req.client_wants_token_ids:
            choice["token_ids"] = self.generated_ids()
            if self.req.kind == "chat":
                obj["prompt_token_ids"] = self.prompt_ids()
            else:
                choice["prompt_token_ids"] = self.prompt_ids()
        obj["usage"] = {**self.usage(), "prompt_tokens_details": None}
        self._provenance(obj)
        return _dumps(obj)


def error_event(message: str, code: int = 503, err_type: str = "service_unavailable") -> bytes:
    """An OpenAI-style error event: the openai SDK raises APIError with this message."""
    return sse.DATA_PREFIX + (_dumps({"error": {"message": message, "type": err_type, "param": None, "code": code}}))


def error_body(message: str, code: int = 503, err_type: str = "service_unavailable") -> bytes:
    return _dumps({"error": {"message": message, "type": err_type, "param": None, "code": code}})
