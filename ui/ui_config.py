"""The chat UI's settings, from its environment, validated once at start (a bad value: one line, exit 2).

Standard library only (the UI's venv has no ernie-mesh package; the unit tests import it from the
main venv). `ernie-mesh up` sets these for the UI it starts (agent/local/plan.py `ui_env`); a
deployed UI reads them from /etc/ernie-mesh/ui.env.

    ERNIE_MESH_API_URL        the gateway's OpenAI API (http://127.0.0.1:8080/v1)
    ERNIE_MESH_API_KEY_FILE   a file holding the gateway API key the UI sends (first line; 0600 or
                              0640): read again when it changes, so a new key needs no restart.
                              `ernie-mesh up` passes its own (.run/api-key)
    ERNIE_MESH_API_KEY        the key itself (or OPENAI_API_KEY), when there is no key file
    ERNIE_MESH_MODEL          the model a new chat starts with ('' = the first of /v1/models)
    ERNIE_MESH_MAX_TOKENS     a new chat's max tokens (512), 1..MAX_TOKENS_LIMIT
    ERNIE_MESH_TEMPERATURE    a new chat's temperature (0.7), 0..2
    ERNIE_MESH_SYSTEM_PROMPT  sent first in every conversation (none)
    ERNIE_MESH_CONSUL_URL     where the welcome counts healthy instances: the Consul HTTP API
                              (http://127.0.0.1:8500, the local agent); anonymous reads suffice
    ERNIE_MESH_CONSUL_TOKEN_FILE  a Consul token with service/node read, if anonymous may not read
    ERNIE_MESH_SERVICE        the engines' Consul service (ernie)
    ERNIE_MESH_SIMULATED      1: the engines are simulated (the welcome says so)
"""

from __future__ import annotations

import math
import os
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_API_URL = "http://127.0.0.1:8080/v1"
DEFAULT_CONSUL_URL = "http://127.0.0.1:8500"
DEFAULT_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 0.7
MAX_TOKENS_LIMIT = 1_000_000
TEMPERATURE_MAX = 2.0  # OpenAI's range


class UiConfigError(ValueError):
    """A setting is wrong: the message names it and says what is expected (one line)."""


@dataclass(frozen=True)
class UiConfig:
    api_url: str = DEFAULT_API_URL
    api_key: str = ""  # the key itself (ERNIE_MESH_API_KEY / OPENAI_API_KEY); ignored with a key file
    api_key_file: str = ""
    model: str = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    system_prompt: str = ""
    consul_url: str = DEFAULT_CONSUL_URL
    consul_token_file: str = ""
    service: str = "ernie"
    simulated: bool = False

    def key_source(self) -> str:
        """Where the API key comes from, for logs and messages (never the key)."""
        if self.api_key_file:
            return f"ERNIE_MESH_API_KEY_FILE ({self.api_key_file})"
        return "ERNIE_MESH_API_KEY" if self.api_key else "none"


def _http_url(name: str, text: str) -> str:
    u = urllib.parse.urlsplit(text)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UiConfigError(f"{name}: {text!r} is not an http(s) URL (e.g. http://127.0.0.1:8080/v1)")
    try:
        u.port  # noqa: B018  (raises ValueError when not a number)
    except ValueError:
        raise UiConfigError(f"{name}: {text!r} has a port that is not a number") from None
    return text.rstrip("/")


def parse_max_tokens(text: str, what: str = "ERNIE_MESH_MAX_TOKENS", limit: int = MAX_TOKENS_LIMIT) -> int:
    """A whole number of tokens, 1..limit; UiConfigError saying so otherwise."""
    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    if not value.is_integer() or not 1 <= value <= limit:
        raise UiConfigError(f"{what}: {str(text).strip()!r} is not a whole number of tokens from 1 to {limit}")
    return int(value)


def parse_temperature(text: str, what: str = "ERNIE_MESH_TEMPERATURE") -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= TEMPERATURE_MAX:  # NaN fails too
        raise UiConfigError(f"{what}: {str(text).strip()!r} is not a number from 0 to {TEMPERATURE_MAX:g}")
    return round(value, 3)


def load(env: Mapping[str, str] | None = None) -> UiConfig:
    """The settings in `env` (os.environ by default); UiConfigError on the first bad one."""
    env = os.environ if env is None else env

    def get(name: str, default: str = "") -> str:
        return (env.get(name) or default).strip()

    key_file = get("ERNIE_MESH_API_KEY_FILE")
    if key_file:
        key_file = str(Path(key_file).expanduser())
        read_key_file(key_file)  # refused at start, not at the first message
    token_file = get("ERNIE_MESH_CONSUL_TOKEN_FILE")
    if token_file:
        token_file = str(Path(token_file).expanduser())
        read_secret_file(token_file, "ERNIE_MESH_CONSUL_TOKEN_FILE")
    simulated = get("ERNIE_MESH_SIMULATED")
    if simulated not in ("", "0", "1"):
        raise UiConfigError(f"ERNIE_MESH_SIMULATED: {simulated!r} is not 1 or 0")
    service = get("ERNIE_MESH_SERVICE", "ernie")
    if not service.replace("-", "").replace("_", "").isalnum():
        raise UiConfigError(f"ERNIE_MESH_SERVICE: {service!r} is not a Consul service name (letters, digits, -, _)")
    return UiConfig(
        api_url=_http_url("ERNIE_MESH_API_URL", get("ERNIE_MESH_API_URL", DEFAULT_API_URL)),
        api_key=get("ERNIE_MESH_API_KEY") or get("OPENAI_API_KEY"),
        api_key_file=key_file,
        model=get("ERNIE_MESH_MODEL"),
        max_tokens=parse_max_tokens(get("ERNIE_MESH_MAX_TOKENS", str(DEFAULT_MAX_TOKENS))),
        temperature=parse_temperature(get("ERNIE_MESH_TEMPERATURE", str(DEFAULT_TEMPERATURE))),
        system_prompt=env.get("ERNIE_MESH_SYSTEM_PROMPT", ""),
        consul_url=_http_url("ERNIE_MESH_CONSUL_URL", get("ERNIE_MESH_CONSUL_URL", DEFAULT_CONSUL_URL)),
        consul_token_file=token_file,
        service=service,
        simulated=simulated == "1",
    )


def read_secret_file(path: str, what: str) -> str:
    """The first line of a secret file; UiConfigError (naming the file, never the secret) if it cannot
    be read, is empty, or every user may read it (as agent/secret_files.py: 0600, or 0640)."""
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text()
    except OSError as e:
        raise UiConfigError(f"{what} {path}: cannot read it ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise UiConfigError(f"{what} {path}: not text") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise UiConfigError(
            f"{what} {path}: every user of this host can read or write it (mode {stat.S_IMODE(mode):04o}); "
            f"chmod 600 {path}"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise UiConfigError(f"{what} {path}: empty (expected the secret on its first line)")
    if any(c.isspace() for c in lines[0]) or not lines[0].isprintable():
        raise UiConfigError(f"{what} {path}: its first line holds spaces or control characters")
    return lines[0]


def read_key_file(path: str) -> str:
    return read_secret_file(path, "ERNIE_MESH_API_KEY_FILE")


class KeyFile:
    """The API key in a file, read again when the file changes (mtime, size): a rotated key is used
    from the next message on. A file that turns unreadable keeps the last good key (logged by the
    caller through `error`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._key = ""
        self.error = ""

    def key(self) -> str:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError as e:
            self.error = f"ERNIE_MESH_API_KEY_FILE {self.path}: cannot read it ({e.strerror or type(e).__name__})"
            return self._key
        if stamp != self._stamp:
            try:
                self._key = read_key_file(self.path)
                self._stamp = stamp
                self.error = ""
            except UiConfigError as e:
                self.error = str(e)
        return self._key
