"""ernie-mesh chat: a Chainlit app that talks to the mesh's gateway (Envoy) with the official OpenAI client.

- A new chat opens with a welcome naming the model and how many of its instances are healthy now
  (Consul's health of the engine service: ui_census.py), and chat settings (the gear by the input):
  the model (every one `/v1/models` lists), the temperature, the max tokens.
- Streams every answer, and names the instance that served it. When the gateway's relay resumed an
  answer on another instance (its engine died, hung or stopped mid-answer: the final chunk's
  `ernie_instances` and `ernie_splices`, docs/gateway.md), a note under the answer says so.
- The conversation lives here, in the user's session, and is sent whole with every message: any
  instance can continue it, so it survives the death of the instance that served the last answer.
- When nothing can answer (no healthy instance: Envoy's 503; the gateway unreachable; the gateway
  refusing the UI's API key: 401, or its limits: 429, 403; a model no longer served: 404), and for
  settings that cannot work, the user reads what happened and what to do, not a stack trace.
- Optional login (ERNIE_MESH_UI_USERS: a file of name:scrypt-hash lines, see ui_users.py); without
  it the chat is open, and a warning is logged when it listens beyond loopback.
- Requests from other sites are refused: an Origin header (websocket handshakes included) must be
  this UI's own origin or one of ERNIE_MESH_UI_ORIGINS; on loopback the Host must be a loopback name.

Settings (environment): ui_config.py (the gateway's URL and API key, the defaults of a new chat,
where Consul is), ERNIE_MESH_UI_USERS (login on; needs CHAINLIT_AUTH_SECRET, 32+ characters, which
`ernie-mesh up` makes), ERNIE_MESH_UI_ORIGINS (other origins allowed, e.g. https://chat.example.com
behind a TLS proxy; comma or space separated). A bad value stops the UI at start with one line (exit 2).
Run: chainlit run ui/app.py (ernie-mesh up does it with .venv-ui).
"""

# No `from __future__ import annotations`: Chainlit loads this file outside sys.modules, where
# dataclasses cannot resolve string annotations.
import asyncio
import ipaddress
import json
import logging
import os
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import chainlit as cl
import openai
import ui_census  # beside this file: Chainlit puts the app's directory on sys.path
import ui_config
import ui_users
from chainlit.config import config as chainlit_config
from chainlit.input_widget import NumberInput, Select, Slider
from chainlit.server import app as chainlit_server
from starlette.middleware.cors import CORSMiddleware

INSTANCE_HEADER = "x-ernie-instance"
INSTANCES_FIELD = "ernie_instances"  # the relay's final chunk: every instance that served, in order
SPLICES_FIELD = "ernie_splices"  # after a resume: completion tokens before each continuation
REQUEST_TIMEOUT_S = 300.0
CONNECT_TIMEOUT_S = 5.0
# Before the first token arrives nothing was shown: try again (Envoy picks a healthy instance).
ATTEMPTS_BEFORE_FIRST_TOKEN = 3
RETRY_BACKOFF_S = (0.5, 1.5)
RETRYABLE_STATUS = (502, 503, 504)
CHARS_PER_TOKEN = 3  # a conservative guess to keep the history inside the context window
DEFAULT_CONTEXT_TOKENS = 2048

USERS_FILE = os.environ.get("ERNIE_MESH_UI_USERS", "")
AUTH_SECRET_MIN_CHARS = 32
LOOPBACK_NAMES = ("localhost",)

log = logging.getLogger("ernie-mesh-ui")


def config_error(message: str) -> NoReturn:
    """Bad settings: one line on stderr, exit 2 (before the UI listens)."""
    print(f"ernie-mesh UI: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


try:
    CFG = ui_config.load()
except ui_config.UiConfigError as e:
    config_error(str(e))
API_URL = CFG.api_url
_key_file = ui_config.KeyFile(CFG.api_key_file) if CFG.api_key_file else None
_clients: dict[str, openai.AsyncOpenAI] = {}


def api_key() -> str:
    """The key the UI sends now: the key file's (read again when it changed), else the setting's."""
    if _key_file is None:
        return CFG.api_key
    key = _key_file.key()
    if _key_file.error:
        log.error("%s (sending the last key read)", _key_file.error)
    return key


def client() -> openai.AsyncOpenAI:
    """The OpenAI client for the current key (one per key: a rotated key gets a new one)."""
    key = api_key()
    if key not in _clients:
        _clients.clear()
        _clients[key] = openai.AsyncOpenAI(
            base_url=API_URL,
            api_key=key or "none",  # the SDK insists on one; the gateway's 401 then says what is missing
            timeout=openai.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            max_retries=0,  # retries are ours: only before the first token, with a message the user can read
        )
    return _clients[key]


def consul_token() -> str:
    if not CFG.consul_token_file:
        return ""
    try:
        return ui_config.read_secret_file(CFG.consul_token_file, "ERNIE_MESH_CONSUL_TOKEN_FILE")
    except ui_config.UiConfigError as e:
        log.error("%s", e)
        return ""


class ChatError(Exception):
    """Nothing could answer: `human` says what happened and what to do, in Markdown."""

    def __init__(self, human: str):
        super().__init__(human)
        self.human = human


@dataclass
class Answer:
    text: str
    instances: list[str]  # every instance that served, in order (more than one: resumed)
    splices: list[int]  # completion tokens before each continuation
    finish_reason: str | None


@dataclass
class ModelInfo:
    name: str
    context_tokens: int


@dataclass
class ChatOptions:
    """One chat's settings (the chat settings panel; defaults from ui_config)."""

    model: str = ""  # '' = not known yet (the gateway did not list its models at chat start)
    temperature: float = CFG.temperature
    max_tokens: int = CFG.max_tokens
    models: dict[str, ModelInfo] = field(default_factory=dict)  # what /v1/models listed at chat start

    def context_tokens(self) -> int:
        info = self.models.get(self.model)
        return info.context_tokens if info else DEFAULT_CONTEXT_TOKENS


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


def key_refused(detail: str) -> ChatError:
    if not api_key():
        what = "**The chat app has no API key for the gateway**"
        fix = "Give the UI a key of the mesh: ERNIE_MESH_API_KEY_FILE (a file, 0600) or ERNIE_MESH_API_KEY"
    elif _key_file is not None:
        what = "**The gateway refused the chat app's API key**"
        fix = (
            f"The key in {CFG.api_key_file} is unknown to the gateway or was revoked: put a valid one "
            "there (the UI reads the file again at the next message, no restart)"
        )
    else:
        what = "**The gateway refused the chat app's API key**"
        fix = (
            "The key in the UI's ERNIE_MESH_API_KEY is unknown to the gateway or was revoked: set it to a "
            "valid one, then restart the UI"
        )
    return ChatError(
        f"{what} (HTTP 401: {detail})\n\nFor whoever runs this mesh: {fix}. `ernie-mesh keys add <name>` "
        "prints a new key; `make up` passes its own, kept in `.run/api-key`."
    )


def status_error(e: openai.APIStatusError, model: str = "") -> ChatError:
    detail = error_detail(e)
    if e.status_code in RETRYABLE_STATUS:
        return no_instance(f"HTTP {e.status_code}: {detail}")
    if e.status_code == 401:
        return key_refused(detail)
    if e.status_code == 429:
        return ChatError(
            f"**Too many requests for the chat app's API key right now** (HTTP 429: {detail})\n\n"
            "Send your message again in a moment."
        )
    if e.status_code == 403:
        return ChatError(
            f"**The chat app's API key may not do this** (HTTP 403: {detail})\n\nChoose another model in the "
            "chat settings (the gear by the input); for whoever runs this mesh: allow the model for that key, "
            "or set ERNIE_MESH_MODEL to a model it may use."
        )
    if e.status_code == 404 and "model" in detail.lower():
        return ChatError(
            f"**The model `{model or '?'}` is not served by this mesh now** ({detail}).\n\n"
            "Choose another model in the chat settings (the gear by the input), or start a new chat: "
            "it lists the models the gateway serves now."
        )
    if 400 <= e.status_code < 500:
        return ChatError(
            f"**The model rejected this request** (HTTP {e.status_code}): {detail}\n\n"
            "If the conversation is long, start a new chat, or lower the max tokens in the chat settings."
        )
    return ChatError(f"**The instance failed to answer** (HTTP {e.status_code}): {detail}\n\nSend your message again.")


async def list_models() -> dict[str, ModelInfo]:
    """Every model the gateway lists (/v1/models), in its order; ChatError when it cannot say."""
    try:
        page = await client().models.list()
    except openai.APIStatusError as e:
        raise status_error(e) from None
    except openai.APIConnectionError as e:
        raise gateway_unreachable(type(e.__cause__ or e).__name__) from None
    out = {}
    for m in page.data:
        extra = getattr(m, "model_extra", None) or {}
        out[m.id] = ModelInfo(m.id, int(extra.get("max_model_len") or DEFAULT_CONTEXT_TOKENS))
    return out


def pick_model(models: dict[str, ModelInfo]) -> str:
    """A new chat's model: ERNIE_MESH_MODEL when listed (or when nothing is listed), else the first."""
    if CFG.model and (CFG.model in models or not models):
        return CFG.model
    return next(iter(models), "")


def session_settings() -> ChatOptions:
    s = cl.user_session.get("settings")
    if not isinstance(s, ChatOptions):
        s = ChatOptions()
        cl.user_session.set("settings", s)
    return s


async def ensure_model(s: ChatOptions) -> ModelInfo:
    """The chat's model; asked of the gateway again when the chat started without knowing it."""
    if not s.model:
        try:
            s.models = await list_models()
        except ChatError as e:
            if CFG.model:  # e.g. no instance yet (503): the chat call will say so
                s.model = CFG.model
                return ModelInfo(CFG.model, DEFAULT_CONTEXT_TOKENS)
            raise e from None
        s.model = pick_model(s.models)
        if not s.model:
            raise no_instance("the gateway lists no model")
    return s.models.get(s.model) or ModelInfo(s.model, DEFAULT_CONTEXT_TOKENS)


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
    system = [{"role": "system", "content": CFG.system_prompt}] if CFG.system_prompt else []
    return system + kept


async def stream_once(messages: list[dict], model: str, msg: cl.Message, max_tokens: int, temperature: float) -> Answer:
    """One request through the gateway, streaming tokens into `msg`. Raises openai errors as they come."""
    parts: list[str] = []
    finish = None
    instances: list[str] = []
    splices: list[int] = []
    async with client().chat.completions.with_streaming_response.create(
        model=model,
        messages=messages,
        stream=True,
        max_tokens=max_tokens,
        temperature=temperature,
    ) as response:
        first = response.headers.get(INSTANCE_HEADER, "")
        stream = await response.parse()
        async for chunk in stream:
            extra = chunk.model_extra or {}
            if isinstance(extra.get(INSTANCES_FIELD), list):  # the relay's final chunk
                instances = [str(i) for i in extra[INSTANCES_FIELD]]
                splices = [int(k) for k in extra.get(SPLICES_FIELD) or [] if isinstance(k, int)]
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            token = choice.delta.content if choice.delta else None
            if token:
                parts.append(token)
                await msg.stream_token(token)
            finish = choice.finish_reason or finish
    return Answer("".join(parts), instances or ([first] if first else []), splices, finish)


async def answer(history: list[dict], msg: cl.Message, s: ChatOptions) -> Answer:
    model = await ensure_model(s)
    max_tokens = s.max_tokens
    messages = fit_history(history, model.context_tokens, max_tokens)
    log.info(
        "sending %d message(s) of conversation to %s (model %s, temperature %g, max tokens %d)",
        len(messages),
        API_URL,
        model.name,
        s.temperature,
        max_tokens,
    )
    last_error: ChatError | None = None
    for attempt in range(ATTEMPTS_BEFORE_FIRST_TOKEN):
        if attempt:
            await asyncio.sleep(RETRY_BACKOFF_S[min(attempt - 1, len(RETRY_BACKOFF_S) - 1)])
        try:
            return await stream_once(messages, model.name, msg, max_tokens, s.temperature)
        except openai.APIStatusError as e:
            last_error = status_error(e, model.name)
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


def footer(result: Answer) -> str:
    """What is written under an answer: who served it, a resume, a cut."""
    lines = []
    if len(result.instances) > 1:
        hops = []
        for i, (before, after) in enumerate(zip(result.instances, result.instances[1:])):
            at = result.splices[i] if i < len(result.splices) else None
            tokens = f" after {at} token{'s' if at != 1 else ''}" if at is not None else ""
            hops.append(f"`{before}` stopped{tokens}, `{after}` continued")
        lines.append(
            "↻ **Resumed on another instance:** "
            + "; ".join(hops)
            + " this same answer from there (the gateway's relay: nothing repeated, nothing lost)."
        )
    first = result.instances[0] if result.instances else ""
    served = f"`{first}`" if first else "an unnamed instance (no x-ernie-instance header)"
    note = ""
    if len(result.instances) > 1:
        note = f" · resumed on `{result.instances[-1]}`"
    if result.finish_reason == "length":
        note += " · stopped at the token limit"
    elif result.finish_reason == "abort":
        note += " · the instance aborted this answer (it was stopping)"
    lines.append(f"*served by instance {served}{note}*")
    return "\n\n" + "\n\n".join(lines)


# --- A chat: welcome, settings, messages ---------------------------------------------------------


def settings_widgets(s: ChatOptions) -> list:
    widgets: list = []
    names = list(s.models) or ([s.model] if s.model else [])
    if names:
        widgets.append(
            Select(
                id="model",
                label="Model",
                values=names,
                initial_value=s.model,
                description="Every model the gateway serves now (/v1/models)",
            )
        )
    widgets.append(
        Slider(
            id="temperature",
            label="Temperature",
            initial=s.temperature,
            min=0,
            max=ui_config.TEMPERATURE_MAX,
            step=0.1,
            description="0: the most likely words; higher: more varied answers",
        )
    )
    widgets.append(
        NumberInput(
            id="max_tokens",
            label="Max tokens",
            initial=s.max_tokens,
            description=f"The longest answer, in tokens (1 to {max_tokens_limit(s)} for this model)",
        )
    )
    return widgets


def max_tokens_limit(s: ChatOptions) -> int:
    return max(s.context_tokens() - 1, 1)


async def census() -> ui_census.Census:
    """How many instances of each model are healthy now (Consul; read each time, never cached)."""
    found = await ui_census.read_census(CFG.consul_url, CFG.service, consul_token())
    if found.error:
        log.warning("instance count: %s", found.error)
    return found


@cl.on_chat_start
async def on_chat_start() -> None:
    cl.user_session.set("history", [])
    s = ChatOptions()  # a new chat starts from the configured defaults
    cl.user_session.set("settings", s)
    problem = ""
    try:
        s.models = await list_models()
    except ChatError as e:
        problem = e.human
    s.model = pick_model(s.models)
    if s.model:
        s.max_tokens = min(s.max_tokens, max_tokens_limit(s))
    await cl.ChatSettings(settings_widgets(s)).send()
    lines = []
    if s.model:
        now = await census()
        lines.append(f"**ernie-mesh chat** · model **{s.model}**: {now.describe(s.model)}.")
        others = [m for m in s.models if m != s.model]
        if others:
            also = [f"**{m}** ({now.describe(m)})" if not now.error else f"**{m}**" for m in others]
            lines.append("Also served: " + ", ".join(also) + ".")
    else:
        lines.append("**ernie-mesh chat** · the gateway did not say which model it serves.")
    if problem:
        lines.append(f"⚠️ {problem}")
    lines.append(
        f"Temperature {s.temperature:g}, max tokens {s.max_tokens}: change them, or the model, in the chat "
        "settings (the gear by the input)."
    )
    if CFG.simulated:
        lines.append(
            "This mesh runs **SIMULATED engines** (`ernie-mesh up --engine-kind simulated`): "
            "answers are placeholder tokens, not a model's text."
        )
    await cl.Message(content="\n\n".join(lines)).send()


@cl.on_settings_update
async def on_settings_update(values: dict) -> None:
    s = session_settings()
    problems = []
    model = str(values.get("model") or s.model)
    if model != s.model:
        s.model = model
    try:
        s.temperature = ui_config.parse_temperature(values.get("temperature", s.temperature), "Temperature")
    except ui_config.UiConfigError as e:
        problems.append(str(e))
    try:
        s.max_tokens = ui_config.parse_max_tokens(
            values.get("max_tokens", s.max_tokens), "Max tokens", max_tokens_limit(s)
        )
    except ui_config.UiConfigError as e:
        problems.append(f"{e} (the context of {s.model or 'this model'} is {s.context_tokens()} tokens)")
        s.max_tokens = min(s.max_tokens, max_tokens_limit(s))
    log.info("settings: model %s, temperature %g, max tokens %d", s.model, s.temperature, s.max_tokens)
    text = (
        f"Settings for the next messages: model **{s.model or '?'}** ({(await census()).describe(s.model)}), "
        f"temperature {s.temperature:g}, max tokens {s.max_tokens}."
    )
    if problems:
        await cl.ChatSettings(settings_widgets(s)).send()  # the panel shows the values kept
        text = "⚠️ **Not changed:** " + "; ".join(problems) + ".\n\n" + text
    await cl.Message(content=text).send()


@cl.on_message
async def on_message(message: cl.Message) -> None:
    if USERS_FILE and not still_a_user(cl.user_session.get("user")):
        await cl.Message(
            content="⚠️ **You are no longer allowed to use this chat:** your user is not in its users file any more."
        ).send()
        return
    s = session_settings()
    history: list[dict] = cl.user_session.get("history") or []
    history.append({"role": "user", "content": message.content})
    msg = cl.Message(content="")
    try:
        result = await answer(history, msg, s)
    except ChatError as e:
        log.warning("not answered: %s", e.human.splitlines()[0])
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
    if len(result.instances) > 1:
        log.info("answer resumed: instances %s, splices %s", result.instances, result.splices)
    if not result.text:
        await msg.stream_token("*(empty answer)*")
    await msg.stream_token(footer(result))
    await msg.send()


# --- Who may use the chat: login (optional), origins ---------------------------------------------


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_origin(text: str) -> str:
    """scheme://host[:port], lower case, without the scheme's default port; ValueError if not an origin."""
    u = urllib.parse.urlsplit(text.strip())
    if u.scheme not in ("http", "https") or not u.hostname or u.username or u.path not in ("", "/"):
        raise ValueError(text)
    if u.query or u.fragment:
        raise ValueError(text)
    port = u.port  # ValueError when not a number
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    default = 443 if u.scheme == "https" else 80
    return f"{u.scheme}://{host}" + (f":{port}" if port and port != default else "")


def parse_origins(text: str) -> tuple[str, ...]:
    out = []
    for item in text.replace(",", " ").split():
        try:
            out.append(normalize_origin(item))
        except ValueError:
            config_error(
                f"ERNIE_MESH_UI_ORIGINS: {item!r} is not an origin: write scheme://host[:port], "
                "e.g. https://chat.example.com (no path; '*' is not accepted)"
            )
    return tuple(dict.fromkeys(out))


BIND_HOST = chainlit_config.run.host or "127.0.0.1"  # chainlit run --host (CHAINLIT_HOST)
LOOPBACK_BIND = is_loopback(BIND_HOST)
EXTRA_ORIGINS = parse_origins(os.environ.get("ERNIE_MESH_UI_ORIGINS", ""))
# On loopback only loopback names are accepted as Host (a DNS-rebinding page would send its own).
EXTRA_HOSTS = tuple(urllib.parse.urlsplit(o).netloc for o in EXTRA_ORIGINS)


def _host_allowed(host: str) -> bool:
    if not LOOPBACK_BIND or host.lower() in EXTRA_HOSTS:
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return is_loopback(name)


def refusal(scope: dict, headers: dict[str, str]) -> str | None:
    """Why this request is refused (None: it may go on). Requests without Origin (curl, a browser's
    same-origin GET) pass; browsers send Origin with every websocket handshake and cross-site request."""
    host = headers.get("host", "")
    if not _host_allowed(host):
        return (
            f"Host {host!r} is not this UI's: it listens on loopback, open it as http://127.0.0.1:<port> "
            "or http://localhost:<port> (or list the origin in ERNIE_MESH_UI_ORIGINS)"
        )
    origin = headers.get("origin")
    if origin is None:
        return None
    scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
    try:
        own = normalize_origin(f"{scheme}://{host}")
        if normalize_origin(origin) in (own, *EXTRA_ORIGINS):
            return None
    except ValueError:
        own = f"{scheme}://{host}"
    return f"Origin {origin!r} is not allowed: this UI's own origin is {own} (others: ERNIE_MESH_UI_ORIGINS)"


class OriginGuard:
    """ASGI middleware, outermost: refuses cross-origin HTTP requests (403, JSON) and websocket
    handshakes (closed before accept: HTTP 403). Chainlit's own socket.io server checks no origin
    (cors_allowed_origins=[]), and CORS only stops a browser reading an answer, not sending."""

    def __init__(self, app):
        self.app = app
        self._logged: set[str] = set()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        reason = refusal(scope, headers)
        if reason is None:
            return await self.app(scope, receive, send)
        if reason not in self._logged and len(self._logged) < 100:
            self._logged.add(reason)
            log.warning("refused %s %s: %s", scope["type"], scope.get("path", ""), reason)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": reason}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def restrict_origins() -> None:
    """Our guard outermost; Chainlit's CORS headers only for the origins listed (config.toml's
    allow_origins is [] so that nothing else reads as allowed)."""
    cors = [m for m in chainlit_server.user_middleware if m.cls is CORSMiddleware]
    if len(cors) != 1:
        config_error("Chainlit's CORS middleware not found: ui/app.py does not know this Chainlit version")
    cors[0].kwargs["allow_origins"] = list(EXTRA_ORIGINS)
    chainlit_config.project.allow_origins = list(EXTRA_ORIGINS)
    chainlit_server.add_middleware(OriginGuard)


_users_cache: tuple[tuple[int, int], dict[str, str]] | None = None


def current_users() -> dict[str, str]:
    """The users file as it is now (read again when it changed): adding or removing a user needs no
    restart. A file gone or broken lets nobody in (logged)."""
    global _users_cache
    path = Path(USERS_FILE).expanduser()
    try:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if _users_cache is not None and _users_cache[0] == stamp:
            return _users_cache[1]
        users = ui_users.load_users(path)
    except (OSError, ui_users.UsersFileError) as e:
        log.error("login refused to everyone: %s", e)
        _users_cache = None
        return {}
    _users_cache = (stamp, users)
    return users


def still_a_user(user: cl.User | None) -> bool:
    return user is not None and user.identifier in current_users()


# Guessing: each check costs ~50 ms of scrypt, and a name is locked after this many failures in the
# window (its right password refused too, until the oldest failure leaves the window).
LOGIN_FAILURES_BEFORE_LOCK = 10
LOGIN_LOCK_WINDOW_S = 600.0
_failed_logins: dict[str, list[float]] = {}


def setup_login() -> None:
    try:
        ui_users.load_users(Path(USERS_FILE).expanduser())
    except ui_users.UsersFileError as e:
        config_error(f"ERNIE_MESH_UI_USERS: {e}")
    secret = os.environ.get("CHAINLIT_AUTH_SECRET", "")
    if len(secret) < AUTH_SECRET_MIN_CHARS:
        config_error(
            f"ERNIE_MESH_UI_USERS is set (login on) but CHAINLIT_AUTH_SECRET is "
            f"{'shorter than ' + str(AUTH_SECRET_MIN_CHARS) + ' characters' if secret else 'not set'}: "
            "set it to a random string (`.venv-ui/bin/chainlit create-secret`; `ernie-mesh up` makes one)"
        )

    @cl.password_auth_callback
    async def password_login(username: str, password: str) -> cl.User | None:
        name = username[:64]
        now = time.monotonic()
        failed = [t for t in _failed_logins.get(name, []) if now - t < LOGIN_LOCK_WINDOW_S]
        if len(failed) >= LOGIN_FAILURES_BEFORE_LOCK:
            log.warning(
                "login refused for user %r: locked (%d failed attempts in %.0f s)",
                name,
                len(failed),
                LOGIN_LOCK_WINDOW_S,
            )
            return None
        users = current_users()
        ok = await asyncio.to_thread(ui_users.check, users, username, password)
        if not ok:
            if len(_failed_logins) > 10_000:  # names are the client's: bound the table
                _failed_logins.clear()
            _failed_logins[name] = [*failed, now]
            log.warning("login refused for user %r", name)
            return None
        _failed_logins.pop(name, None)
        log.info("login: %s", username)
        return cl.User(identifier=username, metadata={"provider": "ernie-mesh-users-file"})


restrict_origins()
if USERS_FILE:
    setup_login()
elif not LOOPBACK_BIND:
    log.warning(
        "WARNING: the chat is OPEN to anyone who can reach %s (no login; everyone spends this UI's API key). "
        "Turn login on with ERNIE_MESH_UI_USERS (see ui/ui_users.py), or listen on 127.0.0.1.",
        BIND_HOST,
    )


def _describe_for_logs() -> str:
    return json.dumps(
        {
            "api_url": API_URL,
            "model": CFG.model or "(first of /v1/models)",
            "max_tokens": CFG.max_tokens,
            "temperature": CFG.temperature,
            "api_key": CFG.key_source(),
            "census": f"Consul {CFG.consul_url}, service {CFG.service}",
            "login": f"users file {USERS_FILE}" if USERS_FILE else "off",
            "listen": BIND_HOST,
            "extra_origins": list(EXTRA_ORIGINS),
        }
    )


log.info("ernie-mesh chat: %s", _describe_for_logs())
