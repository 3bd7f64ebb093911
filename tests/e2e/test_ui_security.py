"""Who may use the chat UI, with Chainlit running for real (from .venv-ui) and its socket.io spoken
as its page speaks it: with login on (ERNIE_MESH_UI_USERS), nobody chats without logging in, and a
guessed name is locked; requests from other sites (Origin, websocket handshakes included; a foreign
Host on loopback) are refused while the UI's own origin (and one listed) works; in Chromium, a login,
then the gateway refusing the UI's API key (a stub answering the gateway's 401 JSON) and its limits
(429, 403) shown as clear messages, and a user removed from the file cut off; the API key read from
its file (ERNIE_MESH_API_KEY_FILE) again when it changes. The chat itself against the stub: the
welcome (the model, its healthy instances as Consul says), the settings panel (every model of
/v1/models, temperature, max tokens; a bad value refused with a message), a resumed answer's note,
a model gone (404). Without a secret the UI refuses to start; open beyond loopback it warns."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent.local.plan import REPO_DIR
from agent.local.ports import free_port
from agent.local.procs import ManagedProcess
from agent.local.wait import wait_until
from tests.e2e.ui_support import (
    ChatPage,
    StubGateway,
    chainlit_command,
    gateway_401_error,
    relay_refusal,
    socketio_connect,
    start_chainlit,
    ui_base_env,
)

pytestmark = pytest.mark.timeout(300)
USER, PASSWORD = "alice", "correct horse battery"
WRONG_KEY = "sk-not-a-key-of-this-mesh"
SECRET = "s" * 48
FOREIGN = "http://evil.example"
PROXIED = "https://chat.example.com"  # the UI's address behind a TLS proxy (ERNIE_MESH_UI_ORIGINS)
GUESSED = "carol"  # a user whose password someone tries to guess
CHATTER = "bob"  # a user who chats (alice is removed from the file by the login test)
ROTATED_KEY = "sk-the-new-key-of-the-ui"
MODELS = ("smollm2", "tiny-ernie")


def add_user(users: Path, name: str, password: str) -> None:
    subprocess.run(
        [sys.executable, str(REPO_DIR / "ui" / "ui_users.py"), "add", str(users), name, "--stdin"],
        input=password + "\n",
        text=True,
        check=True,
        capture_output=True,
    )


@dataclass
class SecuredUI:
    ui: ManagedProcess
    url: str
    gateway: StubGateway
    users: Path
    key_file: Path

    def login(
        self, password: str = PASSWORD, origin: str | None = None, name: str = USER, base: str | None = None
    ) -> httpx.Response:
        """POST /login as the page does (its Origin: the address it was opened at)."""
        base = base or self.url
        headers = {"Origin": origin if origin is not None else base}
        return httpx.post(f"{base}/login", data={"username": name, "password": password}, headers=headers)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui-security")
    users = tmp / "ui-users"
    add_user(users, USER, PASSWORD)
    add_user(users, GUESSED, PASSWORD)
    add_user(users, CHATTER, PASSWORD)
    assert oct(users.stat().st_mode & 0o777) == "0o600" and PASSWORD not in users.read_text()
    gateway = StubGateway(models=MODELS)
    key_file = tmp / "api-key"
    key_file.write_text(WRONG_KEY + "\n")
    key_file.chmod(0o600)
    env = {
        "ERNIE_MESH_UI_USERS": str(users),
        "CHAINLIT_AUTH_SECRET": SECRET,
        "ERNIE_MESH_API_KEY_FILE": str(key_file),
        "ERNIE_MESH_UI_ORIGINS": PROXIED,
        "ERNIE_MESH_CONSUL_URL": gateway.consul_url,
        "ERNIE_MESH_MAX_TOKENS": "48",
    }
    ui, url = start_chainlit(tmp / "ui.log", gateway.url, env=env)
    try:
        yield SecuredUI(ui, url, gateway, users, key_file)
    finally:
        ui.stop(10)
        gateway.close()
    assert "Traceback" not in ui.log_path.read_text(errors="replace")


def test_nobody_chats_without_logging_in(secured):
    refused = socketio_connect(secured.url, origin=secured.url)
    assert refused.startswith("44"), refused  # CONNECT_ERROR; the same packet with a cookie is accepted below
    assert "Authentication failed in websocket connect" in secured.ui.log_path.read_text()
    assert secured.login("wrong password").status_code == 401
    assert secured.login(PASSWORD, name="mallory").status_code == 401
    ok = secured.login()
    assert ok.status_code == 200, ok.text
    token = ok.cookies.get("access_token")
    assert token
    accepted = socketio_connect(secured.url, origin=secured.url, cookie=f"access_token={token}")
    assert accepted.startswith("40{") and '"sid"' in accepted, accepted
    log = secured.ui.log_path.read_text()
    assert "login refused for user 'mallory'" in log and f"login: {USER}" in log


def test_a_guessed_name_is_locked_after_10_failures(secured):
    for i in range(10):
        assert secured.login(f"guess {i}", name=GUESSED).status_code == 401
    assert secured.login(PASSWORD, name=GUESSED).status_code == 401  # the right one, too late
    log = secured.ui.log_path.read_text()
    assert f"login refused for user {GUESSED!r}: locked (10 failed attempts in 600 s)" in log
    assert secured.login().status_code == 200  # another name is not affected


def test_other_origins_are_refused_the_own_one_works(secured):
    import websocket

    token = secured.login().cookies["access_token"]
    cookie = f"access_token={token}"
    # a page on another site opening the chat's websocket with the user's cookie: refused at the handshake
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        socketio_connect(secured.url, origin=FOREIGN, cookie=cookie)
    assert refused.value.status_code == 403
    port = secured.url.rsplit(":", 1)[1]
    for origin in (f"http://localhost:{port}", "null", f"https://127.0.0.1:{port}"):
        with pytest.raises(websocket.WebSocketBadStatusException):
            socketio_connect(secured.url, origin=origin, cookie=cookie)
    # the same through the UI's own origin (and a client that sends no Origin) is accepted
    assert socketio_connect(secured.url, origin=secured.url, cookie=cookie).startswith("40{")
    assert socketio_connect(secured.url, cookie=cookie).startswith("40{")
    # HTTP: a cross-site form post to /login, a CORS preflight: 403, no cookie, no CORS grant
    posted = secured.login(origin=FOREIGN)
    assert posted.status_code == 403 and "access_token" not in posted.cookies, posted.text
    assert "is not allowed" in posted.json()["detail"]
    preflight = httpx.options(
        f"{secured.url}/project/settings",
        headers={"Origin": FOREIGN, "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    # the UI listens on loopback: a page of another name resolving to it (DNS rebinding) is refused
    rebound = httpx.get(secured.url, headers={"Host": f"evil.example:{port}"})
    assert rebound.status_code == 403, rebound.text
    # open as http://localhost:<port>: its own origin there
    local = f"http://localhost:{port}"
    assert httpx.get(local).status_code == 200
    assert secured.login(base=local).status_code == 200
    # the origin listed in ERNIE_MESH_UI_ORIGINS (a proxy passing Host on): accepted, granted CORS
    proxied = {"Origin": PROXIED, "Host": "chat.example.com"}
    assert httpx.get(secured.url, headers=proxied).status_code == 200
    assert socketio_connect(secured.url, origin=PROXIED, cookie=cookie).startswith("40{")
    granted = httpx.options(
        f"{secured.url}/project/settings", headers={**proxied, "Access-Control-Request-Method": "GET"}
    )
    assert granted.status_code == 200 and granted.headers["access-control-allow-origin"] == PROXIED


def test_browser_login_then_a_refused_api_key_is_a_clear_message(secured):
    with ChatPage(secured.url) as page:
        page.driver.get(secured.url)
        assert not page.log_in(USER, "not the password"), "logged in with a wrong password"
        assert not page.chat_input_shown()
        assert page.log_in(USER, PASSWORD), page.page_text()
        reply = page.ask("Hello?", timeout_s=60)
        assert "gateway refused the chat app's API key" in reply.text, reply.text
        assert "HTTP 401" in reply.text and gateway_401_error()["error"]["message"] in reply.text, reply.text
        assert "Traceback" not in reply.text and WRONG_KEY not in reply.text
        assert f"Bearer {WRONG_KEY}" in secured.gateway.authorizations
        # the relay's refusals of a valid key: over its rate limit (429), a model it may not use (403)
        limit = "rate limit reached for API key 'ui': 2 requests per minute; retry in 31s"
        secured.gateway.refuse_chat(429, relay_refusal(limit, "requests", "rate_limit_exceeded"))
        reply = page.ask("Hello again?", timeout_s=60)
        assert "Too many requests for the chat app's API key" in reply.text and limit in reply.text, reply.text
        denied = "the API key 'ui' may not use model 'smollm2' (allowed: ernie)"
        secured.gateway.refuse_chat(403, relay_refusal(denied, "invalid_request_error", "model_not_allowed"))
        reply = page.ask("And now?", timeout_s=60)
        assert "may not do this" in reply.text and "ERNIE_MESH_MODEL" in reply.text and denied in reply.text
        # the user removed from the file (no restart): the open session can no longer chat
        subprocess.run(
            [sys.executable, str(REPO_DIR / "ui" / "ui_users.py"), "remove", str(secured.users), USER],
            check=True,
            capture_output=True,
        )
        calls = len(secured.gateway.authorizations)
        removed = page.ask("Still there?", timeout_s=60)
        assert "no longer allowed to use this chat" in removed.text, removed.text
        assert len(secured.gateway.authorizations) == calls, "a removed user's message reached the gateway"


def test_welcome_settings_and_a_resumed_answer(secured):
    gw = secured.gateway
    gw.instances = {"smollm2": ["passing", "critical"], "tiny-ernie": ["passing"]}
    gw.stream_chat(["The capital", " of France", " is Paris."], ["ernie-a", "ernie-b"], [2])
    secured.key_file.write_text(ROTATED_KEY + "\n")  # a new key in the file: used without a restart
    with ChatPage(secured.url) as page:
        assert page.log_in(CHATTER, PASSWORD), page.page_text()
        welcome = page.welcome()
        assert "model smollm2: 1 of 2 instances healthy" in welcome, welcome
        assert "tiny-ernie (1 of 1 instance healthy)" in welcome and "max tokens 48" in welcome, welcome
        gw.instances["smollm2"] = ["critical", "critical"]  # both die: a new chat's welcome says so
        welcome = page.new_chat()
        assert "model smollm2: none of its 2 instances is healthy right now" in welcome, welcome
        # the settings: every model the gateway lists; a bad max tokens is refused with a sentence
        page.open_settings()
        assert page.model_options() == list(MODELS)
        page.choose_model("tiny-ernie")
        page.set_temperature(2)
        page.set_max_tokens("-5")
        said = page.confirm_settings()
        assert "Not changed: Max tokens: '-5' is not a whole number of tokens from 1 to 2047" in said, said
        assert "model tiny-ernie (1 of 1 instance healthy), temperature 0.2, max tokens 48" in said, said
        page.open_settings()
        page.set_max_tokens("160")
        said = page.confirm_settings()
        assert "model tiny-ernie (1 of 1 instance healthy), temperature 0.2, max tokens 160" in said, said
        # an answer the relay resumed on another instance: the note says so, under the answer
        reply = page.ask("What is the capital of France?", timeout_s=60)
        assert "The capital of France is Paris." in reply.text, reply.text
        assert "Resumed on another instance: ernie-a stopped after 2 tokens, ernie-b continued" in reply.text
        assert reply.instance == "ernie-a" and "resumed on ernie-b" in reply.text, reply.text
        sent = gw.bodies[-1]
        assert (sent["model"], sent["temperature"], sent["max_tokens"]) == ("tiny-ernie", 0.2, 160), sent
        assert gw.authorizations[-1] == f"Bearer {ROTATED_KEY}"
        # the chosen model no longer served (its last instance gone): the gateway's 404
        gone = "The model `tiny-ernie` does not exist."
        gw.refuse_chat(404, relay_refusal(gone, "NotFoundError", "model_not_found"))
        reply = page.ask("And of Italy?", timeout_s=60)
        shown = gone.replace("`", "")  # the page renders the code span
        assert "The model tiny-ernie is not served by this mesh now" in reply.text and shown in reply.text
        assert "Choose another model in the chat settings" in reply.text and "Traceback" not in reply.text


def test_login_without_a_secret_refuses_to_start(tmp_path):
    users = tmp_path / "ui-users"
    add_user(users, USER, PASSWORD)
    env = {k: v for k, v in os.environ.items() if k != "CHAINLIT_AUTH_SECRET"}
    env.update(ui_base_env("http://127.0.0.1:9/v1"), ERNIE_MESH_UI_USERS=str(users))
    out = subprocess.run(
        chainlit_command(free_port()),
        env=env,
        cwd=REPO_DIR / "ui",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "CHAINLIT_AUTH_SECRET is not set" in lines[0], out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_open_beyond_loopback_warns(tmp_path):
    ui, url = start_chainlit(tmp_path / "ui.log", "http://127.0.0.1:9/v1", host="0.0.0.0")
    try:
        wait_until(lambda: "the chat is OPEN" in ui.log_path.read_text(), 10, what="the warning in the UI log")
        # not on loopback: any Host is served (the address the LAN uses), Origins still checked
        assert httpx.get(url, headers={"Host": "chat.lan:8000"}).status_code == 200
        assert httpx.get(f"{url}/project/settings", headers={"Origin": FOREIGN}).status_code == 403
    finally:
        ui.stop(10)
