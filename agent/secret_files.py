"""Files that hold a secret (the engine agent's control token, the engines' API key): read them
refusing a file every user can read, create one (0600) with a random value.

Format: one secret per line; blank lines and lines starting with `#` are ignored. A secret is
never logged, never put in argv, never in an error message (the path is)."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from agent.config import ConfigError


def read_secrets(path: str, what: str) -> list[str]:
    """The secrets in `path`, in order; ConfigError (one line, naming the file) if it cannot be read,
    holds none, or can be read by every user (it must be 0600, or 0640 for a group)."""
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read it ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not text") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(
            f"{what} {path}: every user of this host can read or write it (mode {stat.S_IMODE(mode):04o}); "
            f"chmod 600 {path}"
        )
    values = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not values:
        raise ConfigError(f"{what} {path}: empty (expected the secret on its first line)")
    for v in values:
        if any(c.isspace() for c in v) or not v.isprintable():
            raise ConfigError(f"{what} {path}: a line holds spaces or control characters (one secret a line)")
    return values


def read_secret(path: str, what: str) -> str:
    """The first secret in `path` (see read_secrets)."""
    return read_secrets(path, what)[0]


def ensure_secret(path: Path) -> str:
    """The secret in `path`, created (0600, 32 random bytes, URL-safe) if the file does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_secret(str(path), "secret file")
    value = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value
