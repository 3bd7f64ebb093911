"""OpenAI/vLLM wire format for the SIMULATED engine: request validation and response shapes.

Pure functions: a request body (already JSON-decoded) becomes a frozen `GenerationParams` or an
`ApiError` whose message names the problem, the way vLLM answers (400 for bad input, 404 for an
unknown model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_MAX_TOKENS = 16
# Without ignore_eos the simulated model "emits EOS" after this many tokens (counted from the
# start of the answer, so a continuation stops where the uninterrupted run would).
NATURAL_COMPLETION_TOKENS = 16
CONTINUATION_SCAN_CHARS = 8192

Kind = Literal["chat", "completion"]
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
_TOKEN_WORD = re.compile(r"tok(\d+)")
_TOKEN_SUFFIX = re.compile(r"tok(\d+)$")
_WORD = re.compile(r"\S+")

ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"), "param": param, "code": status}}


@dataclass(frozen=True)
class GenerationParams:
    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int
    ignore_eos: bool
    prompt_tokens: int
    first_token_index: int  # > 0 when the prompt already ends with tok0..tok{n-1} (a resumed answer)
    leading_space: bool  # the first token needs a separating space (the prompt ends mid-answer)

    def plan(self) -> tuple[int, str]:
        """(number of tokens to generate, finish_reason when all were generated)."""
        if self.ignore_eos:
            return self.max_tokens, "length"
        natural = max(0, NATURAL_COMPLETION_TOKENS - self.first_token_index)
        if natural < self.max_tokens:
            return natural, "stop"
        return self.max_tokens, "length"


def token_text(index: int, first: bool, leading_space: bool) -> str:
    """The text of generated token number `index` (deterministic: tok0 tok1 tok2 ...)."""
    sep = " " if (not first or leading_space) else ""
    return f"{sep}tok{index}"


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def continuation_index(text: str) -> int:
    """n when `text` ends with `tok0 tok1 ... tok{n-1}` (an answer of ours fed back), else 0."""
    run: list[int] = []
    for word in reversed(text[-CONTINUATION_SCAN_CHARS:].split()):
        m = _TOKEN_WORD.fullmatch(word)
        if m is None:
            m = _TOKEN_SUFFIX.search(word)  # the answer was appended without a space: "Hi!tok0"
            if m is not None:
                run.append(int(m.group(1)))
            break
        run.append(int(m.group(1)))
    run.reverse()
    if not run:
        return 0
    # The run must end with a whole answer: tok0, tok1, ... consecutive up to the last word.
    n = run[-1] + 1
    return n if n <= len(run) and run[-n:] == list(range(n)) else 0


def _require(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise ApiError(400, message, param)


def _opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    _require(isinstance(value, bool), f"`{key}` must be a boolean, got {value!r}", key)
    return bool(value)


def _opt_number(body: dict[str, Any], key: str) -> None:
    value = body.get(key)
    if value is not None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok, f"`{key}` must be a number, got {value!r}", key)


def _content_text(content: object, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    _require(isinstance(content, list), f"{where}.content must be a string or a list of parts", "messages")
    texts = []
    for j, part in enumerate(content):  # type: ignore[arg-type]
        _require(isinstance(part, dict) and isinstance(part.get("type"), str),
                 f"{where}.content[{j}] must be an object with a `type`", "messages")
        if part["type"] == "text":
            _require(isinstance(part.get("text"), str), f"{where}.content[{j}].text must be a string", "messages")
            texts.append(part["text"])
    return " ".join(texts)


def _chat_prompt(body: dict[str, Any]) -> tuple[int, int, bool]:
    """(prompt_tokens, continuation index, leading space) of a chat request."""
    _require("messages" in body, "missing required field `messages`", "messages")
    messages = body["messages"]
    _require(isinstance(messages, list) and len(messages) > 0, "`messages` must be a non-empty list", "messages")
    words = 0
    last_role, last_text = "", ""
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        _require(isinstance(msg, dict), f"{where} must be an object", "messages")
        role = msg.get("role")
        _require(isinstance(role, str) and role in CHAT_ROLES,
                 f"{where}.role must be one of {', '.join(sorted(CHAT_ROLES))}, got {role!r}", "messages")
        last_role, last_text = role, _content_text(msg.get("content"), where)
        words += count_words(last_text)
    if last_role == "assistant":  # continue_final_message: resume our own answer
        index = continuation_index(last_text)
        return max(1, words), index, index > 0 and not last_text[-1:].isspace()
    return max(1, words), 0, False


def _completion_prompt(body: dict[str, Any]) -> tuple[int, int, bool]:
    _require("prompt" in body, "missing required field `prompt`", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        _require(prompt != "", "`prompt` must not be empty", "prompt")
        index = continuation_index(prompt)
        return max(1, count_words(prompt)), index, index > 0 and not prompt[-1:].isspace()
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return len(prompt), 0, False
    raise ApiError(400, "`prompt` must be a non-empty string, a list of one string, or a list of token ids"
                   " (the simulated engine serves one prompt per request)", "prompt")


def parse_generation(kind: Kind, body: object, served_model: str, max_model_len: int) -> GenerationParams:
    """Validate a /v1/chat/completions (kind "chat") or /v1/completions body the way vLLM does."""
    _require(isinstance(body, dict), "the request body must be a JSON object", "body")
    assert isinstance(body, dict)
    model = body.get("model", served_model)
    if model is None:
        model = served_model
    _require(isinstance(model, str), f"`model` must be a string, got {model!r}", "model")
    if model != served_model:
        raise ApiError(404, f"The model `{model}` does not exist.", "model")
    prompt_tokens, first_index, leading_space = _chat_prompt(body) if kind == "chat" else _completion_prompt(body)

    stream = _opt_bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        _require(isinstance(options, dict), "`stream_options` must be an object", "stream_options")
        _require(stream, "Stream options can only be defined when `stream=True`.", "stream_options")
        include_usage = _opt_bool(options, "include_usage", False)
    ignore_eos = _opt_bool(body, "ignore_eos", False)
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _opt_number(body, key)
    n = body.get("n")
    if n is not None:
        _require(isinstance(n, int) and not isinstance(n, bool) and n == 1,
                 f"`n` must be 1 (the simulated engine returns one choice), got {n!r}", "n")

    key = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    _require(isinstance(max_tokens, int) and not isinstance(max_tokens, bool),
             f"`{key}` must be an integer, got {max_tokens!r}", key)
    _require(max_tokens >= 1, f"`{key}` must be at least 1, got {max_tokens}", key)
    _require(prompt_tokens + max_tokens <= max_model_len,
             f"This model's maximum context length is {max_model_len} tokens. However, you requested "
             f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
             f"completion). Please reduce the length of the messages or completion.", key)
    return GenerationParams(kind, model, stream, include_usage, max_tokens, ignore_eos, prompt_tokens,
                            first_index, leading_space)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(p: GenerationParams, request_id: str, created: int, text: str, finish_reason: str,
                  completion_tokens: int) -> dict[str, Any]:
    if p.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text}
        obj = "text_completion"
    choice.update({"logprobs": None, "finish_reason": finish_reason, "stop_reason": None})
    return {"id": request_id, "object": obj, "created": created, "model": p.model, "choices": [choice],
            "usage": usage(p.prompt_tokens, completion_tokens)}


def chunk(p: GenerationParams, request_id: str, created: int, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None) -> dict[str, Any]:
    """One streamed chunk: a role announcement, a token, or the finish (text None, finish_reason set)."""
    if p.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or ""}
        obj = "text_completion"
    choice.update({"logprobs": None, "finish_reason": finish_reason})
    if finish_reason is not None:
        choice["stop_reason"] = None
    out: dict[str, Any] = {"id": request_id, "object": obj, "created": created, "model": p.model, "choices": [choice]}
    if p.include_usage:
        out["usage"] = None
    return out


def usage_chunk(p: GenerationParams, request_id: str, created: int, completion_tokens: int) -> dict[str, Any]:
    obj = "chat.completion.chunk" if p.kind == "chat" else "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": p.model, "choices": [],
            "usage": usage(p.prompt_tokens, completion_tokens)}
