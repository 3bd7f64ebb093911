"""Keep the gateway's rendered API keys (run_dir/keys) in step with where they are kept.

Consul KV is followed with blocking queries (a change arrives at once); a TOML file is polled
once a second. Whatever fails (Consul away, a bad file), the last rendered keys stay: Envoy goes
on accepting the keys it had and nothing is revoked or granted by accident. A malformed KV entry
is skipped with a warning (the others stay valid).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from agent.catalog.base import CatalogError, KeyValueStore
from agent.config import ConfigError
from agent.gateway import keys
from agent.gateway.rendered import POLL_S

log = logging.getLogger(__name__)

WAIT_S = 55.0
BACKOFF_S = (0.5, 5.0)


class KeysWatch:
    def __init__(
        self,
        directory: Path,
        store: KeyValueStore | None = None,
        file: str = "",
        on_load: Callable[[int], None] | None = None,
        wait_s: float = WAIT_S,
    ):
        if (store is None) == (not file):
            raise ValueError("KeysWatch needs exactly one source: a KV store or a file")
        self.directory = directory
        self.store = store
        self.file = file
        self.on_load = on_load
        self.wait_s = wait_s
        self.index = 0
        self.loaded: int | None = None  # keys rendered last, None before the first success
        self.last_error = ""
        self.stop_event = threading.Event()
        self._file_stamp: tuple[float, int] | None = None
        self._thread: threading.Thread | None = None

    @property
    def source(self) -> str:
        return f"file {self.file}" if self.file else f"Consul KV {keys.KV_PREFIX}"

    def prepare(self) -> None:
        """Before Envoy starts: render the current keys, or keep the last rendered ones (an empty
        set the first time: every request is refused until keys can be read)."""
        try:
            self.load_once()
        except (CatalogError, ConfigError) as e:
            self.last_error = str(e)
            if not (self.directory / keys.ENVOY_FILE).exists():
                keys.write_files(self.directory, keys.KeySet())
            log.error("API keys: cannot read %s (%s); keeping the last ones rendered", self.source, e)

    def load_once(self, wait: bool = False) -> bool:
        """One read of the source; True if the rendered keys changed."""
        if self.file:
            loaded = keys.from_file(self.file)
            errors: list[str] = []
        else:
            assert self.store is not None
            index, tree = self.store.kv_tree(keys.KV_PREFIX, self.index, self.wait_s if wait else 0.0)
            if index < self.index:
                index = 0  # Consul's index went backwards (a restarted agent): start over
            self.index = index
            loaded, errors = keys.from_kv(tree)
        for line in errors:
            log.warning("API keys: skipping %s", line)
        names = [k.name for k in loaded]
        if len(set(names)) != len(names):
            raise ConfigError(f"API keys: a name is used twice in {self.source}")
        changed = keys.write_files(self.directory, keys.KeySet(tuple(loaded)))
        if changed or self.loaded is None:
            log.info("API keys: %d from %s (%s)", len(loaded), self.source, ", ".join(names) or "none")
        self.loaded, self.last_error = len(loaded), ""
        if self.on_load:
            self.on_load(len(loaded))
        return changed

    # --- thread -----------------------------------------------------------------------------------

    def start(self) -> KeysWatch:
        self._thread = threading.Thread(target=self.run, name="keys-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        backoff = BACKOFF_S[0]
        while not self.stop_event.is_set():
            try:
                if self.file:
                    if self._file_changed():
                        self.load_once()
                    self.stop_event.wait(POLL_S)
                else:
                    self.load_once(wait=True)
                backoff = BACKOFF_S[0]
            except (CatalogError, ConfigError, OSError) as e:
                if str(e) != self.last_error:
                    log.error("API keys: %s; keeping the last ones rendered (retrying)", e)
                self.last_error = str(e)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
            except Exception:  # noqa: BLE001 - the watch must outlive any surprise
                log.exception("API keys: watch failed; retrying")
                self.stop_event.wait(BACKOFF_S[1])

    def _file_changed(self) -> bool:
        try:
            st = os.stat(self.file)
        except OSError:
            raise ConfigError(f"api_keys file {self.file} not found") from None
        stamp = (st.st_mtime, st.st_size)
        changed = stamp != self._file_stamp
        self._file_stamp = stamp
        return changed
