"""Drive the Chainlit UI in Debian's headless Chromium (selenium + chromium-driver; no browser download);
start it alone (`start_chainlit`); speak its socket.io protocol (`socketio_connect`); a stub gateway
that refuses as the real one does (`StubGateway`: 401, 429, 403)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from agent.local.plan import REPO_DIR, default_ui_venv
from agent.local.ports import free_port
from agent.local.procs import ManagedProcess

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER_PATHS = ("/usr/bin/chromedriver",)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)
SERVED_BY = "served by instance"
ASSISTANT = '[data-step-type="assistant_message"] .message-content'
PAGE_LOAD_TIMEOUT_S = 180.0
POLL_S = 0.2  # each poll runs JavaScript in the page: keep the browser's CPU use low
UI_START_TIMEOUT_S = 180.0
LOGIN_FAILED = ("Unable to sign in", "Sign in failed")  # Chainlit's messages (translations/en-US.json)


def chainlit_command(port: int, host: str = "127.0.0.1") -> list[str]:
    chainlit = str(default_ui_venv() / "bin" / "chainlit")
    return [chainlit, "run", "app.py", "--headless", "--host", host, "--port", str(port)]


NO_CONSUL = "http://127.0.0.1:9"  # nothing listens there: the welcome says the count is unknown


def ui_base_env(api_url: str, consul_url: str = NO_CONSUL) -> dict[str, str]:
    return {
        "ERNIE_MESH_API_URL": api_url,
        "ERNIE_MESH_MODEL": "smollm2",
        "ERNIE_MESH_CONSUL_URL": consul_url,
        "CHAINLIT_APP_ROOT": str(REPO_DIR / "ui"),
    }


def start_chainlit(
    log_path: Path, api_url: str, env: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> tuple[ManagedProcess, str]:
    """The UI alone (from .venv-ui, as `up` runs it), answering on http://127.0.0.1:<port>."""
    port = free_port()
    ui = ManagedProcess(
        "ui",
        chainlit_command(port, host),
        log_path,
        env={**ui_base_env(api_url), **(env or {})},
        cwd=str(REPO_DIR / "ui"),
    ).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + UI_START_TIMEOUT_S
    while True:
        if not ui.alive():
            raise AssertionError(f"Chainlit exited ({ui.returncode}):\n{ui.log_tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return ui, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            ui.stop(10)
            raise AssertionError(f"Chainlit not answering on {url} within {UI_START_TIMEOUT_S:.0f}s")
        time.sleep(0.25)


def socketio_connect(url: str, origin: str | None = None, cookie: str | None = None) -> str:
    """Open Chainlit's socket.io websocket as its page does and ask for a new chat session (the
    socket.io CONNECT packet with Chainlit's auth fields). Returns the server's answer: `40{...}`
    accepted, `44{...}` refused. A refused handshake raises websocket.WebSocketBadStatusException."""
    import websocket  # websocket-client, a dependency of selenium

    ws_url = "ws" + url.removeprefix("http") + "/ws/socket.io/?EIO=4&transport=websocket"
    ws = websocket.create_connection(ws_url, timeout=15, origin=origin, suppress_origin=origin is None, cookie=cookie)
    try:
        opening = ws.recv()
        assert str(opening).startswith("0{"), f"no engine.io OPEN packet: {opening!r}"
        auth = {"sessionId": str(uuid.uuid4()), "clientType": "webapp", "userEnv": "{}", "threadId": None}
        ws.send("40" + json.dumps(auth))
        while True:
            packet = str(ws.recv())
            if packet == "2":  # engine.io ping
                ws.send("3")
                continue
            return packet
    finally:
        ws.close()


def gateway_401_error() -> dict:
    """The error the real gateway answers without a valid key (Envoy's local reply in the bootstrap)."""
    text = (REPO_DIR / "envoy" / "bootstrap.yaml").read_text()
    m = re.search(r'message: "([^"]+)"\s+type: (\w+)\s+code: invalid_api_key', text)
    assert m, "the 401 local reply (code invalid_api_key) is not in envoy/bootstrap.yaml any more"
    return {"error": {"message": m.group(1), "type": m.group(2), "code": "invalid_api_key", "param": None}}


def relay_refusal(message: str, err_type: str, code: str) -> dict:
    """A refusal of the gateway's relay (rate limit 429, model not allowed 403), as it writes them."""
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


class StubGateway:
    """Refuses as the gateway does. By default every request gets its 401 (no valid key: Envoy
    answers before any route); `refuse_chat(...)` makes it list the models and refuse only chat
    completions, as the relay does (429, 403, 404); `stream_chat(...)` makes it answer them with a
    stream whose final chunk carries the relay's provenance (`ernie_instances`, `ernie_splices`).
    It also answers Consul's health read of the engine service (`consul_url`, `instances`: model ->
    list of check statuses). Records the Authorization headers and chat bodies it gets."""

    def __init__(self, models: tuple[str, ...] = ("smollm2",)) -> None:
        self.authorizations: list[str | None] = []
        self.bodies: list[dict] = []
        self.chat: tuple[int, dict] | None = None
        self.stream: tuple[list[str], list[str], list[int]] | None = None
        self.instances: dict[str, list[str]] = {m: ["passing"] for m in models}
        stub = self
        data = [{"id": m, "object": "model", "max_model_len": 2048} for m in models]
        listed = json.dumps({"object": "list", "data": data})

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _answer(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/v1/health/service/"):
                    return self._send(200, json.dumps(stub.consul_nodes()).encode())
                stub.authorizations.append(self.headers.get("Authorization"))
                if self.path.endswith("/chat/completions") and raw:
                    stub.bodies.append(json.loads(raw))
                if stub.chat is None and stub.stream is None:
                    return self._send(401, json.dumps(gateway_401_error()).encode())
                if self.path.endswith("/models"):
                    return self._send(200, listed.encode())
                if stub.stream is not None:
                    return self._send(200, stub.sse(stub.bodies[-1]["model"]), "text/event-stream")
                assert stub.chat is not None
                self._send(stub.chat[0], json.dumps(stub.chat[1]).encode())

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.consul_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = f"{self.consul_url}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def refuse_chat(self, status: int, error: dict) -> None:
        self.chat, self.stream = (status, error), None

    def stream_chat(self, pieces: list[str], instances: list[str], splices: list[int]) -> None:
        self.chat, self.stream = None, (pieces, instances, splices)

    def sse(self, model: str) -> bytes:
        assert self.stream is not None
        pieces, instances, splices = self.stream
        base = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1, "model": model}
        events = [{**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
        final = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "ernie_instances": instances}
        if splices:
            final["ernie_splices"] = splices
        events.append(final)
        return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"

    def consul_nodes(self) -> list[dict]:
        return [
            {
                "Service": {"ID": f"{model}-{i}", "Meta": {"served_model_name": model}},
                "Checks": [{"Status": "passing"}, {"Status": status}],
            }
            for model, statuses in self.instances.items()
            for i, status in enumerate(statuses)
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def find_browser() -> tuple[str, str] | None:
    browser = next((p for p in CHROMIUM_PATHS if shutil.which(p)), None)
    driver = next((p for p in CHROMEDRIVER_PATHS if shutil.which(p)), None)
    return (browser, driver) if browser and driver else None


@dataclass
class Reply:
    text: str  # the final text of the assistant message
    partials: list[str] = field(default_factory=list)  # distinct texts seen while it streamed

    @property
    def streamed(self) -> bool:
        """Seen growing: some non-empty text before the final one, without the closing footer yet."""
        return any(p and SERVED_BY not in p and p != self.text for p in self.partials)

    @property
    def instance(self) -> str:
        """The instance named in the footer ('served by instance `ID`')."""
        tail = self.text.rsplit(SERVED_BY, 1)[-1].strip()
        return tail.split()[0].strip("`*·") if tail else ""


class ChatPage:
    """One browser session on the Chainlit app; each ChatPage is a fresh user session (fresh profile)."""

    def __init__(self, url: str):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        found = find_browser()
        if found is None:
            raise RuntimeError("chromium and chromedriver not found: apt-get install chromium chromium-driver")
        browser, driver = found
        self.profile = tempfile.mkdtemp(prefix="ernie-ui-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=driver))
        # A page load on a machine at load 40 (CI, and six helpers' tests) took over 47 s: chromedriver's
        # "Timed out receiving message from renderer" at 60 s failed test_ui_security and test_ui_chat.
        self.driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
        self.url = url

    def open(self, timeout_s: float = 60.0) -> None:
        self.driver.get(self.url)
        self._until(lambda: self._input() is not None, timeout_s, "the chat input")

    def log_in(self, name: str, password: str, timeout_s: float = 60.0) -> bool:
        """Fill Chainlit's login form (where the page sends a visitor without a session) and submit it:
        True once the chat input shows, False on Chainlit's 'Sign in failed'."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        self.driver.get(self.url)  # a fresh page: no error left from an earlier attempt
        self._until(
            lambda: self.driver.find_elements(By.ID, "password") and not self._login_failed(),
            timeout_s,
            "the login form",
        )
        for field_id, value in (("email", name), ("password", password)):
            box = self.driver.find_element(By.ID, field_id)
            box.clear()
            box.send_keys(value)
        self.driver.find_element(By.ID, "password").send_keys(Keys.ENTER)
        outcome = self._until(
            lambda: "in" if self._input() is not None else ("failed" if self._login_failed() else ""),
            timeout_s,
            "the chat input or a login error",
        )
        return outcome == "in"

    def _login_failed(self) -> bool:
        text = self.page_text()
        return any(m in text for m in LOGIN_FAILED)

    def chat_input_shown(self) -> bool:
        return self._input() is not None

    def _input(self):
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By

        try:
            found = self.driver.find_elements(By.ID, "chat-input")
            return found[0] if found and found[0].is_displayed() else None
        except StaleElementReferenceException:
            return None

    def _until(self, predicate, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(POLL_S)
        raise AssertionError(f"UI: {what} not seen within {timeout_s:.0f}s; page text:\n{self.page_text()[-2000:]}")

    def page_text(self) -> str:
        from selenium.webdriver.common.by import By

        try:
            return self.driver.find_element(By.TAG_NAME, "body").text
        except Exception as e:  # the page may be mid-render; the text is only for failure messages
            return f"(page text unavailable: {e})"

    def assistant_texts(self) -> list[str]:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By

        try:
            return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, ASSISTANT)]
        except StaleElementReferenceException:
            return self.assistant_texts()

    def ask(self, question: str, timeout_s: float = 240.0, on_partial=None) -> Reply:
        """Type `question`, press Enter, and follow the new assistant message until its footer appears
        (`on_partial(text)` is called with each new text seen while it streams)."""
        self.welcome()  # the chat's first message: never taken for the answer
        before = len(self.assistant_texts())
        self._type(question)
        partials: list[str] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            texts = self.assistant_texts()
            new = texts[before:]
            if new:
                current = "\n".join(new)
                if not partials or partials[-1] != current:
                    partials.append(current)
                if SERVED_BY in current or "⚠" in current:
                    return Reply(current, partials)
                if on_partial is not None:
                    on_partial(current)
            time.sleep(POLL_S)
        raise AssertionError(
            f"UI: no complete answer to {question!r} within {timeout_s:.0f}s; "
            f"seen {partials[-3:]}; page:\n{self.page_text()[-2000:]}"
        )

    # --- the welcome and the chat settings panel (the gear by the input) ---------------------------

    def welcome(self, timeout_s: float = 60.0) -> str:
        """The first assistant message of this chat (the app's welcome)."""
        return self._until(lambda: (self.assistant_texts() or [""])[0], timeout_s, "the welcome message")

    def new_chat(self, timeout_s: float = 60.0) -> str:
        """Chainlit's New chat button (and its confirmation): a new chat with its own welcome, which
        is returned once the old chat's messages are gone from the page."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By

        old = self.driver.find_elements(By.CSS_SELECTOR, "[data-step-type]")
        self._until(lambda: self.driver.find_elements(By.ID, "new-chat-button"), 30, "the New chat button")
        self.driver.find_element(By.ID, "new-chat-button").click()

        def gone(element) -> bool:
            try:
                element.is_enabled()
                return False
            except StaleElementReferenceException:
                return True

        def started() -> bool:
            """The old chat's messages gone; the confirmation asked first when the user had written."""
            for button in self.driver.find_elements(By.CSS_SELECTOR, "#new-chat-dialog #confirm"):
                try:
                    button.click()
                except StaleElementReferenceException:
                    pass
            return all(gone(e) for e in old)

        self._until(started, timeout_s, "a new chat (the old chat's messages gone)")
        return self.welcome(timeout_s)

    def open_settings(self) -> None:
        from selenium.webdriver.common.by import By

        self._until(lambda: self.driver.find_elements(By.ID, "chat-settings-open-modal"), 30, "the settings button")
        self.driver.find_element(By.ID, "chat-settings-open-modal").click()
        self._until(lambda: self.driver.find_elements(By.ID, "chat-settings"), 30, "the settings panel")

    def model_options(self) -> list[str]:
        """The models the panel's Model list offers (opened, read, closed again)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        self.driver.find_element(By.ID, "model").click()
        options = self._until(
            lambda: self.driver.find_elements(By.CSS_SELECTOR, '[role="option"]'), 30, "the model list"
        )
        names = [o.text.strip() for o in options]
        self.driver.switch_to.active_element.send_keys(Keys.ESCAPE)  # closes the list, not the panel
        self._until(lambda: not self.driver.find_elements(By.CSS_SELECTOR, '[role="option"]'), 30, "the list closed")
        return names

    def choose_model(self, name: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.ID, "model").click()
        options = self._until(
            lambda: [
                o for o in self.driver.find_elements(By.CSS_SELECTOR, '[role="option"]') if o.text.strip() == name
            ],
            30,
            f"the model {name!r} in the list",
        )
        options[0].click()
        self._until(lambda: self.driver.find_element(By.ID, "model").text.strip() == name, 30, f"{name!r} chosen")

    def set_temperature(self, tenths: int) -> None:
        """The slider (step 0.1) moved with its keys: Home (0), then one step right per tenth."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        thumb = self.driver.find_element(By.CSS_SELECTOR, '#temperature [role="slider"]')
        thumb.send_keys(Keys.HOME, *([Keys.ARROW_RIGHT] * tenths))

    def set_max_tokens(self, value: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        box = self.driver.find_element(By.ID, "max_tokens")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE, value)

    def confirm_settings(self) -> str:
        """Press Confirm; returns the app's answer (the next assistant message)."""
        from selenium.webdriver.common.by import By

        before = len(self.assistant_texts())
        self.driver.find_element(By.ID, "confirm").click()
        self._until(lambda: not self.driver.find_elements(By.ID, "chat-settings"), 30, "the settings panel closed")
        return self._until(lambda: "\n".join(self.assistant_texts()[before:]), 60, "the app's answer to the settings")

    def _type(self, text: str, attempts: int = 10) -> None:
        """Type into the chat input and press Enter (React may re-render the input: find it again)."""
        from selenium.common.exceptions import ElementNotInteractableException, StaleElementReferenceException
        from selenium.webdriver.common.keys import Keys

        for _ in range(attempts):
            box = self._until(self._input, 30, "the chat input")
            try:
                box.click()
                box.send_keys(text, Keys.ENTER)
                return
            except (StaleElementReferenceException, ElementNotInteractableException):
                time.sleep(0.2)
        raise AssertionError(f"UI: could not type into the chat input after {attempts} attempts")

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> ChatPage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
