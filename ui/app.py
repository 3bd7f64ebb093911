"""ernie-mesh chat: a Chainlit app that talks to the mesh's gateway (Envoy) with the official OpenAI client.

- Streams every answer, and names the instance that served it (Envoy's `x-ernie-instance` header).
- The conversation lives here, in the user's session, and is sent whole with every message: any
  instance can continue it, so it survives the death of the instance that served the last answer.
- When nothing can answer (no healthy instance: Envoy's 503; the gateway unreachable; the gateway
  refusing the UI's API key: 401, or its limits: 429, 403), the user reads what happened and what
  to do, not a stack trace.
- Optional login (ERNIE_MESH_UI_USERS: a file of name:scrypt-hash lines, see ui_users.py); without
  it the chat is open, and a warning is logged when it listens beyond loopback.
- Requests from other sites are refused: an Origin header (websocket handshakes included) must be
  this UI's own origin or one of ERNIE_MESH_UI_ORIGINS; on loopback the Host must be a loopback name.

Settings (environment): ERNIE_MESH_API_URL (default http://127.0.0.1:8080/v1), ERNIE_MESH_MODEL
(default: the first model of /v1/models), ERNIE_MESH_MAX_TOKENS (512), ERNIE_MESH_TEMPERATURE
(0.7), ERNIE_MESH_SYSTEM_PROMPT (none), ERNIE_MESH_API_KEY or OPENAI_API_KEY (the gateway's API key;
`ernie-mesh up` passes the one it created), ERNIE_MESH_UI_USERS (login on; needs
CHAINLIT_AUTH_SECRET, 32+ characters, which `ernie-mesh up` makes), ERNIE_MESH_UI_ORIGINS (other
origins allowed, e.g. https://chat.example.com behind a TLS proxy; comma or space separated).
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
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import chainlit as cl
import openai
import ui_users  # beside this file: Chainlit puts the app's directory on sys.path
from chainlit.config import config as chainlit_config
from chainlit.server import app as chainlit_server
from starlette.middleware.cors import CORSMiddleware

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

API_KEY = os.environ.get("ERNIE_MESH_API_KEY") or os.environ.get("OPENAI_API_KEY") or ""
USERS_FILE = os.environ.get("ERNIE_MESH_UI_USERS", "")
AUTH_SECRET_MIN_CHARS = 32
LOOPBACK_NAMES = ("localhost",)

log = logging.getLogger("ernie-mesh-ui")

client = openai.AsyncOpenAI(
    base_url=API_URL,
    api_key=API_KEY or "none",  # the SDK insists on one; the gateway's 401 then says what is missing
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


def key_refused(detail: str) -> ChatError:
    if not API_KEY:
        what = "**The chat app has no API key for the gateway**"
        fix = "Set ERNIE_MESH_API_KEY in the UI's environment to a key of the mesh"
    else:
        what = "**The gateway refused the chat app's API key**"
        fix = "The key in the UI's ERNIE_MESH_API_KEY is unknown to the gateway or was revoked: set it to a valid one"
    return ChatError(
        f"{what} (HTTP 401: {detail})\n\nFor whoever runs this mesh: {fix} (`ernie-mesh keys add <name>` "
        "prints a new key; `make up` passes its own, kept in `.run/api-key`), then restart the UI."
    )


def status_error(e: openai.APIStatusError) -> ChatError:
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
            f"**The chat app's API key may not do this** (HTTP 403: {detail})\n\nFor whoever runs this "
            "mesh: allow the model for that key, or set ERNIE_MESH_MODEL to a model it may use."
        )
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
    if USERS_FILE and not still_a_user(cl.user_session.get("user")):
        await cl.Message(
            content="⚠️ **You are no longer allowed to use this chat:** your user is not in its users file any more."
        ).send()
        return
    history: list[dict] = cl.user_session.get("history") or []
    history.append({"role": "user", "content": message.content})
    msg = cl.Message(content="")
    try:
        result = await answer(history, msg)
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


# --- Who may use the chat: login (optional), origins ---------------------------------------------


def config_error(message: str) -> NoReturn:
    """Bad settings: one line on stderr, exit 2 (before the UI listens)."""
    print(f"ernie-mesh UI: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


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
            "model": MODEL or "(first of /v1/models)",
            "max_tokens": MAX_TOKENS,
            "api_key": "set" if API_KEY else "none",
            "login": f"users file {USERS_FILE}" if USERS_FILE else "off",
            "listen": BIND_HOST,
            "extra_origins": list(EXTRA_ORIGINS),
        }
    )


log.info("ernie-mesh chat: %s", _describe_for_logs())
