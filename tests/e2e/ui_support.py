"""Drive the Chainlit UI in Debian's headless Chromium (selenium + chromium-driver; no browser download)."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field

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
POLL_S = 0.2  # each poll runs JavaScript in the page: keep the browser's CPU use low


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
        self.driver.set_page_load_timeout(60)
        self.url = url

    def open(self, timeout_s: float = 60.0) -> None:
        self.driver.get(self.url)
        self._until(lambda: self._input() is not None, timeout_s, "the chat input")

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

    def ask(self, question: str, timeout_s: float = 240.0) -> Reply:
        """Type `question`, press Enter, and follow the new assistant message until its footer appears."""
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
            time.sleep(POLL_S)
        raise AssertionError(
            f"UI: no complete answer to {question!r} within {timeout_s:.0f}s; "
            f"seen {partials[-3:]}; page:\n{self.page_text()[-2000:]}"
        )

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
