"""The API keys the benchmarks' gateways accept ([edge] api_keys = a file): the edge runs as users
run it, keys on. The second key has request and token limits far above any benchmark's load: a
request with it goes through the relay's rate-limit check (bench/overhead.py prices that)."""

from __future__ import annotations

from pathlib import Path

BENCH_API_KEY = "sk-ernie-bench-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {BENCH_API_KEY}"}
LIMITED_API_KEY = "sk-ernie-bench-limited-0123456789abcdef"
LIMITED_AUTH = {"Authorization": f"Bearer {LIMITED_API_KEY}"}
NEVER_REACHED = 1_000_000_000  # per minute


def keys_file(directory: Path) -> str:
    """Write the keys file (0600) for a benchmark gateway; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "api-keys.toml"
    path.write_text(
        f'[keys.bench]\nkey = "{BENCH_API_KEY}"\n\n'
        f'[keys.bench-limited]\nkey = "{LIMITED_API_KEY}"\n'
        f"requests_per_minute = {NEVER_REACHED}\ntokens_per_minute = {NEVER_REACHED}\n"
    )
    path.chmod(0o600)
    return str(path)
