"""Files the gateway agent renders for Envoy (and the relay) to read: private, replaced atomically
(Envoy watches the directory for the rename), and — for those rendered from an operator's files
(the edge certificate, the engines' key) — followed: the sources are looked at once a second and
re-rendered when they change; whatever goes wrong later is logged and the last rendering stays."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from agent.config import ConfigError

log = logging.getLogger(__name__)

POLL_S = 1.0


def private_dir(directory: Path) -> None:
    """`directory` exists, mode 0700 (whatever it was created with before)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)


def write_private(path: Path, text: str) -> bool:
    """Atomically replace `path` (0600) with `text`; False if it already holds it."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


class FollowedFiles:
    """`render()` of an operator's `sources` into `target`, again whenever a source's mtime changes."""

    def __init__(self, what: str, setting: str, sources: tuple[str, ...], target: Path, render: Callable[[], str]):
        self.what, self.setting, self.sources, self.target, self.render = what, setting, sources, target, render
        self._stamp: tuple[float, ...] | None = None
        self.stop_event = threading.Event()
        self.last_error = ""

    def sync(self) -> bool:
        """Render if a source changed; True if the target did. ConfigError (or OSError) if unusable."""
        stamp = tuple(os.stat(p).st_mtime for p in self.sources)
        if stamp == self._stamp:
            return False
        text = self.render()
        private_dir(self.target.parent)
        changed = write_private(self.target, text)
        self._stamp = stamp
        if changed:
            log.info("%s loaded from %s", self.what, ", ".join(self.sources))
        return changed

    def prepare(self) -> FollowedFiles:
        """Before Envoy starts: an unusable source is a ConfigError (the agent exits 2)."""
        try:
            self.sync()
        except OSError as e:
            raise ConfigError(f"{self.setting}: {e.strerror or e}") from None
        return self

    def start(self) -> FollowedFiles:
        threading.Thread(target=self._run, name=self.what, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def _run(self) -> None:
        while not self.stop_event.wait(POLL_S):
            try:
                self.sync()
                self.last_error = ""
            except (OSError, ConfigError) as e:
                if str(e) != self.last_error:
                    log.error("%s: %s; keeping the one in use", self.what, e)
                self.last_error = str(e)
