"""Product and harness apart: the production commands import no test or local-mesh support, and
every third-party module the package (agent/, bench/) imports is a declared dependency."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What `ernie-mesh engine | gateway | relay` (and drain, status) load, including the modules the
# relay imports only once it serves.
PRODUCTION = {
    "engine": ["agent.engine.cli"],
    "gateway": ["agent.gateway.cli"],
    "relay": ["agent.gateway.relay.server", "agent.gateway.relay.handler", "agent.gateway.relay.ads_client"],
    "drain": ["agent.engine.drain_cli"],
    "status": ["agent.status"],
}

# Test and local-mesh support: the dev Consul, wait helpers, free ports, the in-memory catalog, the
# local mesh, the simulated engine, the benchmarks.
HARNESS = ("agent.local", "agent.catalog.memory", "agent.sim", "bench", "tests")

# Imported lazily behind an ImportError guard: vLLM's CPU build (scripts/install.sh installs it,
# not pyproject.toml) and what comes with it, or installed on purpose; not required.
OPTIONAL = {"vllm", "torch", "transformers", "safetensors", "gguf", "uvloop"}


def loaded_modules(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def is_harness(module: str) -> bool:
    return any(module == h or module.startswith(h + ".") for h in HARNESS)


@pytest.mark.parametrize("command", sorted(PRODUCTION))
def test_production_commands_import_no_harness_module(command):
    harness = {m for m in loaded_modules(PRODUCTION[command]) if is_harness(m)}
    assert harness == set(), f"`ernie-mesh {command}` imports test/local-mesh support: {sorted(harness)}"


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", d).group(0)) for d in deps}


def third_party_imports() -> dict[str, set[str]]:
    """Imported module -> the files importing it, for every non-stdlib import under agent/ and bench/."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "agent").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("agent", "bench") or top in OPTIONAL:
                    continue
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def installed_files(dist: str) -> set[str]:
    try:
        return {str(f) for f in metadata.distribution(dist).files or ()}
    except metadata.PackageNotFoundError:
        return set()


def module_paths(module: str) -> set[str]:
    """Where `module` would be in a distribution's file list (a package or a module)."""
    rel = module.replace(".", "/")
    return {f"{rel}/__init__.py", f"{rel}.py"}


def test_every_third_party_import_is_a_declared_dependency():
    provided = set().union(*(installed_files(d) for d in declared()))
    missing = {
        module: sorted(files)
        for module, files in sorted(third_party_imports().items())
        if not module_paths(module) & provided
    }
    assert not missing, f"imported but provided by no dependency in pyproject.toml: {missing}"
