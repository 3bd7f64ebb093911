"""The API key the benchmarks' gateways accept ([edge] api_keys = a file): the edge runs as users
run it, keys on."""

from __future__ import annotations

from pathlib import Path

BENCH_API_KEY = "sk-ernie-bench-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {BENCH_API_KEY}"}


def keys_file(directory: Path) -> str:
    """Write the keys file (0600) for a benchmark gateway; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "api-keys.toml"
    path.write_text(f'[keys.bench]\nkey = "{BENCH_API_KEY}"\n')
    path.chmod(0o600)
    return str(path)
