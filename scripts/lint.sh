#!/usr/bin/env bash
# Lint and types, as `make test` runs them before the tests: ruff (lint + format check) and mypy
# (agent/ strict, bench/ default; configuration in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-$PWD/.venv}
printf '\033[1m==> %s\033[0m\n' "ruff check · ruff format --check · mypy" >&2
"$VENV/bin/ruff" check --quiet .
"$VENV/bin/ruff" format --check --quiet .
"$VENV/bin/mypy"
