"""OpenAI/vLLM request validation for the SIMULATED engine.

Pure functions: a request body (already JSON-decoded) becomes a frozen `GenerationParams` or an
`ApiError` whose message names the problem, the way vLLM answers (400 for bad input, 404 for an
unknown model). Prompts are tokenized by `agent.sim.tokens`; the response shapes are in `wire`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from agent.sim import tokens

DEFAULT_MAX_TOKENS = 16
# Without ignore_eos the simulated model emits EOS after this many tokens (counted from the start of
# the answer, so a continuation stops where the uninterrupted run would); EOS counts as a token.
NATURAL_COMPLETION_TOKENS = 16

Kind = Literal["chat", "completion"]
CHAT_ROLES = frozenset(tokens.ROLE_TOKEN_IDS)

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
class Prompt:
    token_ids: tuple[int, ...]
    first_token_index: int  # > 0 when the prompt already ends with tok0..tok{n-1} (a resumed answer)
    leading_space: bool  # the first token needs a separating space (the prompt ends mid-answer)


def text_prompt(ids: list[int], text: str) -> Prompt:
    """A prompt given as text: it continues an answer when its IDs end with one."""
    n = tokens.continuation_index(ids)
    return Prompt(tuple(ids), n, n > 0 and not text[-1:].isspace())


def continuation_index(text: str) -> int:
    """n when `text` ends with `tok0 tok1 ... tok{n-1}` (an answer of ours fed back), else 0."""
    return tokens.continuation_index(tokens.tokenize(text))


@dataclass(frozen=True)
class GenerationParams:
    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    return_token_ids: bool
    max_tokens: int
    ignore_eos: bool
    prompt: Prompt

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.token_ids)

    def plan(self) -> tuple[int, str]:
        """(number of tokens to generate, EOS included; finish_reason when all were generated)."""
        if self.ignore_eos:
            return self.max_tokens, "length"
        natural = max(0, NATURAL_COMPLETION_TOKENS - self.prompt.first_token_index)
        if natural < self.max_tokens:
            return natural + 1, "stop"
        return self.max_tokens, "length"

    def token(self, i: int) -> tuple[str, int]:
        """(text, ID) of token number `i` of this answer (0-based); the last one of a "stop" plan is EOS."""
        planned, finish = self.plan()
        if finish == "stop" and i == planned - 1:
            return "", tokens.EOS_TOKEN_ID
        k = self.prompt.first_token_index + i
        return tokens.generated_text(
            k, first=i == 0, leading_space=self.prompt.leading_space
        ), tokens.generated_token_id(k)


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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _content_text(content: object, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", "messages")
    texts: list[str] = []
    for j, part in enumerate(content):
        _require(
            isinstance(part, dict) and isinstance(part.get("type"), str),
            f"{where}.content[{j}] must be an object with a `type`",
            "messages",
        )
        if part["type"] == "text":
            _require(isinstance(part.get("text"), str), f"{where}.content[{j}].text must be a string", "messages")
            texts.append(part["text"])
    return " ".join(texts)


def _chat_prompt(body: dict[str, Any]) -> Prompt:
    _require("messages" in body, "missing required field `messages`", "messages")
    messages = body["messages"]
    _require(isinstance(messages, list) and len(messages) > 0, "`messages` must be a non-empty list", "messages")
    turns: list[tuple[str, str]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        _require(isinstance(msg, dict), f"{where} must be an object", "messages")
        role = msg.get("role")
        _require(
            isinstance(role, str) and role in CHAT_ROLES,
            f"{where}.role must be one of {', '.join(sorted(CHAT_ROLES))}, got {role!r}",
            "messages",
        )
        turns.append((role, _content_text(msg.get("content"), where)))
    continue_final = _opt_bool(body, "continue_final_message", False)
    add_generation_prompt = _opt_bool(body, "add_generation_prompt", True)
    # vLLM refuses the pair (its validator, or the HF chat template for the default add_generation_prompt).
    _require(
        not (continue_final and add_generation_prompt),
        "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        "continue_final_message",
    )
    ids = tokens.chat_prompt_ids(turns, add_generation_prompt, continue_final)
    return text_prompt(ids, turns[-1][1]) if continue_final else Prompt(tuple(ids), 0, False)


def _token_id_prompt(prompt: list[object]) -> Prompt:
    _require(len(prompt) > 0, "The decoder prompt cannot be empty", "prompt")
    for t in prompt:
        _require(_is_int(t), f"`prompt` token ids must be integers, got {t!r}", "prompt")
    ids = [int(t) for t in prompt]  # type: ignore[call-overload]
    for bad in (min(ids), max(ids)):
        _require(0 <= bad < tokens.VOCAB_SIZE_TOKENS, f"Token id {bad} is out of vocabulary", "prompt")
    n = tokens.continuation_index(ids)
    return Prompt(tuple(ids), n, n > 0)  # the prompt ends with a generated token: no space after it


def _completion_prompt(body: dict[str, Any]) -> Prompt:
    _require("prompt" in body, "missing required field `prompt`", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        _require(prompt != "", "`prompt` must not be empty", "prompt")
        return text_prompt(tokens.tokenize(prompt), prompt)
    if isinstance(prompt, list) and all(not isinstance(t, (str, list)) for t in prompt):
        return _token_id_prompt(prompt)
    raise ApiError(
        400,
        "`prompt` must be a non-empty string, a list of one string, a list of token ids or a "
        "list of one list of token ids (the simulated engine serves one prompt per request)",
        "prompt",
    )


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
    prompt = _chat_prompt(body) if kind == "chat" else _completion_prompt(body)

    stream = _opt_bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        _require(isinstance(options, dict), "`stream_options` must be an object", "stream_options")
        _require(stream, "Stream options can only be defined when `stream=True`.", "stream_options")
        include_usage = _opt_bool(options, "include_usage", False)
    ignore_eos = _opt_bool(body, "ignore_eos", False)
    return_token_ids = _opt_bool(body, "return_token_ids", False)
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _opt_number(body, key)
    n = body.get("n")
    if n is not None:
        _require(_is_int(n) and n == 1, f"`n` must be 1 (the simulated engine returns one choice), got {n!r}", "n")

    key = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    _require(_is_int(max_tokens), f"`{key}` must be an integer, got {max_tokens!r}", key)
    _require(max_tokens >= 1, f"`{key}` must be at least 1, got {max_tokens}", key)
    prompt_tokens = len(prompt.token_ids)
    _require(
        prompt_tokens + max_tokens <= max_model_len,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
        f"completion). Please reduce the length of the messages or completion.",
        key,
    )
    return GenerationParams(kind, model, stream, include_usage, return_token_ids, max_tokens, ignore_eos, prompt)
