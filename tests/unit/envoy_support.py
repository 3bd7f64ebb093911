"""Envoy's own verdict on a rendered bootstrap (`envoy --mode validate`), for the unit tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.binaries import MissingBinary, envoy_binary


def envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    try:
        binary = envoy_binary()
    except MissingBinary as e:
        pytest.fail(f"{e} (make test installs it)")
    return subprocess.run(
        [binary, "--mode", "validate", "-c", str(path), "-l", "warning"], capture_output=True, text=True, timeout=60
    )
