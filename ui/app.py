"""ernie-mesh chat: a Chainlit app that talks to the mesh's gateway (Envoy) with the official OpenAI client.

- Streams every answer, and names the instance that served it (Envoy's `x-ernie-instance` header).
- The conversation lives here, in the user's session, and is sent whole with every message: any
  instance can continue it, so it survives the death of the instance that served the last answer.
- When nothing can answer (no healthy instance: Envoy's 503; the gateway unreachable), the user
  reads what happened and what to do, not a stack trace.

Settings (environment): ERNIE_MESH_API_URL (default http://127.0.0.1:8080/v1), ERNIE_MESH_MODEL
(default: the first model of /v1/models), ERNIE_MESH_MAX_TOKENS (512), ERNIE_MESH_TEMPERATURE
(0.7), ERNIE_MESH_SYSTEM_PROMPT (none), ERNIE_MESH_API_KEY or OPENAI_API_KEY (the gateway's API key;
`ernie-mesh up` passes the one it created).
Run: chainlit run ui/app.py (ernie-mesh up does it with .venv-ui).
"""

# No `from __future__ import annotations`: Chainlit loads this file outside sys.modules, where
# dataclasses cannot resolve string annotations.
import asyncio
import json
import logging
import os
from dataclasses import dataclass

import chainlit as cl
import openai

API_URL = os.environ.get("ERNIE_MESH_API_URL", "http://127.0.0.1:8080/v1").rstrip("/")
MODEL = os.environ.get("ERNIE_MESH_MODEL", "")
MAX_TOKENS = int(os.environ.get("ERNIE_MESH_MAX_TOKENS", "512"))
TEMPERATURE = float(os.environ.get("ERNIE_MESH_TEMPERATURE", "0.7"))
SYSTEM_PROMPT = os.environ.get("ERNIE_MESH_SYSTEM_PROMPT", "")
SIMULATED = os.environ.get("ERNIE_MESH_SIMULATED", "") == "1"
INSTANCE_HEADER = "x-ernie-instance"
REQUEST_TIMEOUT_S = 300.0
CONNECT_TIMEOUT_S = 5.0
# Before the first token arrives nothing was shown: try again (Envoy picks a healthy instance).
ATTEMPTS_BEFORE_FIRST_TOKEN = 3
RETRY_BACKOFF_S = (0.5, 1.5)
RETRYABLE_STATUS = (502, 503, 504)
CHARS_PER_TOKEN = 3  # a conservative guess to keep the history inside the context window
DEFAULT_CONTEXT_TOKENS = 2048

log = logging.getLogger("ernie-mesh-ui")

client = openai.AsyncOpenAI(
    base_url=API_URL,
    api_key=os.environ.get("ERNIE_MESH_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none",
    timeout=openai.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
    max_retries=0,  # retries are ours: only before the first token, with a message the user can read
)


class ChatError(Exception):
    """Nothing could answer: `human` says what happened and what to do, in Markdown."""

    def __init__(self, human: str):
        super().__init__(human)
        self.human = human


@dataclass
class Answer:
    text: str
    instance: str
    finish_reason: str | None


@dataclass
class ModelInfo:
    name: str
    context_tokens: int


_model_cache: ModelInfo | None = None


def gateway_unreachable(detail: str) -> ChatError:
    return ChatError(
        f"**The gateway is unreachable** at `{API_URL}` ({detail}).\n\n"
        "Is the mesh running? Start it with `make up` (or `ernie-mesh up`), then send your message again."
    )


def no_instance(detail: str) -> ChatError:
    return ChatError(
        "**No model instance is available right now.** The gateway has no healthy instance to send "
        f"your message to ({detail}).\n\nInstances come back by themselves as soon as they pass their "
        "health check (see `ernie-mesh status` or the Consul UI): send your message again in a moment."
    )


def error_detail(e: openai.APIStatusError) -> str:
    """The gateway's JSON error message (Envoy answers in the OpenAI error shape), else the raw body."""
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(body.get("message"), str):
            return body["message"]
    try:
        text = e.response.text
    except Exception:  # the body may be gone with the connection
        text = ""
    return (text or str(e)).strip()[:300]


def status_error(e: openai.APIStatusError) -> ChatError:
    detail = error_detail(e)
    if e.status_code in RETRYABLE_STATUS:
        return no_instance(f"HTTP {e.status_code}: {detail}")
    if e.status_code == 404 and "model" in detail.lower():
        return ChatError(
            f"**The model `{MODEL or '?'}` is not served by this mesh** ({detail}). "
            "Set ERNIE_MESH_MODEL to one of the names `/v1/models` lists."
        )
    if 400 <= e.status_code < 500:
        return ChatError(
            f"**The model rejected this request** (HTTP {e.status_code}): {detail}\n\n"
            "If the conversation is long, start a new chat."
        )
    return ChatError(f"**The instance failed to answer** (HTTP {e.status_code}): {detail}\n\nSend your message again.")


async def model_info() -> ModelInfo:
    """The served model: ERNIE_MESH_MODEL, else the first of /v1/models (cached once known)."""
    global _model_cache
    if _model_cache is not None:
        return _model_cache
    try:
        page = await client.models.list()
    except openai.APIStatusError as e:
        if MODEL and e.status_code in RETRYABLE_STATUS:
            return ModelInfo(MODEL, DEFAULT_CONTEXT_TOKENS)  # no instance yet: the chat call will say so
        raise status_error(e) from None
    except openai.APIConnectionError as e:
        raise gateway_unreachable(type(e.__cause__ or e).__name__) from None
    models = list(page.data)
    chosen = next((m for m in models if m.id == MODEL), None) if MODEL else (models[0] if models else None)
    if chosen is None:
        if MODEL:
            return ModelInfo(MODEL, DEFAULT_CONTEXT_TOKENS)
        raise no_instance("the gateway lists no model")
    extra = getattr(chosen, "model_extra", None) or {}
    _model_cache = ModelInfo(chosen.id, int(extra.get("max_model_len") or DEFAULT_CONTEXT_TOKENS))
    return _model_cache


def fit_history(history: list[dict], context_tokens: int, max_tokens: int) -> list[dict]:
    """The most recent messages that fit the context window (the last user message always stays)."""
    budget_chars = max(context_tokens - max_tokens, 256) * CHARS_PER_TOKEN
    kept: list[dict] = []
    used = 0
    for m in reversed(history):
        used += len(m["content"]) + 16
        if kept and used > budget_chars:
            break
        kept.append(m)
    kept.reverse()
    while len(kept) > 1 and kept[0]["role"] != "user":  # start on a user turn
        kept.pop(0)
    system = [{"role": "system", "content": SYSTEM_PROMPT}] if SYSTEM_PROMPT else []
    return system + kept


async def stream_once(messages: list[dict], model: ModelInfo, msg: cl.Message, max_tokens: int) -> Answer:
    """One request through the gateway, streaming tokens into `msg`. Raises openai errors as they come."""
    parts: list[str] = []
    finish = None
    async with client.chat.completions.with_streaming_response.create(
        model=model.name,
        messages=messages,
        stream=True,
        max_tokens=max_tokens,
        temperature=TEMPERATURE,
    ) as response:
        instance = response.headers.get(INSTANCE_HEADER, "")
        stream = await response.parse()
        async for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            token = choice.delta.content if choice.delta else None
            if token:
                parts.append(token)
                await msg.stream_token(token)
            finish = choice.finish_reason or finish
    return Answer("".join(parts), instance, finish)


async def answer(history: list[dict], msg: cl.Message) -> Answer:
    model = await model_info()
    max_tokens = min(MAX_TOKENS, max(model.context_tokens // 2, 16))
    messages = fit_history(history, model.context_tokens, max_tokens)
    log.info("sending %d message(s) of conversation to %s (model %s)", len(messages), API_URL, model.name)
    last_error: ChatError | None = None
    for attempt in range(ATTEMPTS_BEFORE_FIRST_TOKEN):
        if attempt:
            await asyncio.sleep(RETRY_BACKOFF_S[min(attempt - 1, len(RETRY_BACKOFF_S) - 1)])
        try:
            return await stream_once(messages, model, msg, max_tokens)
        except openai.APIStatusError as e:
            last_error = status_error(e)
            if e.status_code not in RETRYABLE_STATUS:
                raise last_error from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            last_error = gateway_unreachable(f"{type(cause).__name__}: {cause}".rstrip(": "))
        except openai.APIError as e:  # an error event inside the stream
            last_error = ChatError(f"**The instance reported an error while answering:** {e.message}")
        if msg.content:  # tokens were shown: the answer was cut off, do not silently start over
            raise ChatError(
                f"{last_error.human}\n\n*The answer above was cut off.* Send your message again: "
                "another instance will answer."
            )
        log.warning("attempt %d failed: %s", attempt + 1, last_error.human.splitlines()[0])
    raise last_error


@cl.on_chat_start
async def on_chat_start() -> None:
    cl.user_session.set("history", [])
    if SIMULATED:
        await cl.Message(
            content="This mesh runs **SIMULATED engines** (`ernie-mesh up --engine-kind simulated`): "
            "answers are placeholder tokens, not a model's text."
        ).send()


@cl.on_message
async def on_message(message: cl.Message) -> None:
    history: list[dict] = cl.user_session.get("history") or []
    history.append({"role": "user", "content": message.content})
    msg = cl.Message(content="")
    try:
        result = await answer(history, msg)
    except ChatError as e:
        history.pop()  # unanswered: the next message starts from the last complete exchange
        if msg.content:
            await msg.send()  # what was shown of a cut-off answer stays visible
        await cl.Message(content=f"⚠️ {e.human}").send()
        return
    except Exception:  # a bug here must still not show the user a stack trace
        log.exception("unexpected error while answering")
        history.pop()
        await cl.Message(
            content="⚠️ **Something went wrong in the chat app** (see the UI log). Send your message again."
        ).send()
        return
    history.append({"role": "assistant", "content": result.text})
    cl.user_session.set("history", history)
    served = f"`{result.instance}`" if result.instance else "an unnamed instance (no x-ernie-instance header)"
    note = ""
    if result.finish_reason == "length":
        note = " · stopped at the token limit"
    elif result.finish_reason == "abort":
        note = " · the instance aborted this answer (it was stopping)"
    if not result.text:
        await msg.stream_token("*(empty answer)*")
    await msg.stream_token(f"\n\n*served by instance {served}{note}*")
    await msg.send()


def _describe_for_logs() -> str:
    return json.dumps({"api_url": API_URL, "model": MODEL or "(first of /v1/models)", "max_tokens": MAX_TOKENS})


log.info("ernie-mesh chat: %s", _describe_for_logs())
