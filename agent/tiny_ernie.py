"""tiny-ernie: a tiny ERNIE-4.5 checkpoint with RANDOM WEIGHTS, built locally — an architecture check.

Real ERNIE-4.5 weights cannot be fetched where only package registries are reachable, but vLLM's
`Ernie4_5ForCausalLM` code path (vllm/model_executor/models/ernie45.py) runs on its CPU build. This
builds a checkpoint for that path: transformers' own `Ernie4_5Config` (model_type `ernie4_5`) with
small dimensions, the architecture name `Ernie4_5ForCausalLM`, weights drawn at random (fixed seed,
so every build is the same) and the embedded default model's tokenizer (SmolLM2's, which carries a
chat template) with a vocabulary of the same size. It answers with noise: it shows that the mesh
serves the ERNIE-4.5 architecture (load, canary, streaming, `ignore_eos`, failover), nothing about
ERNIE's quality. The real model is `--model baidu/ERNIE-4.5-0.3B-PT` on a GPU host (docs/up.md).

    python -m agent.model prepare --model tiny-ernie [--dest DIR] [--json]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agent.model import (
    CHECKPOINT_DTYPE,
    WEIGHTS_FILE,
    ModelPrepError,
    Progress,
    build_once,
    cache_dir,
    prepare_default_model,
)

NAME = "tiny-ernie"  # `--model tiny-ernie`, and the name clients send
MODEL_DIR_NAME = "tiny-ernie-4.5-random"
ARCHITECTURE = "Ernie4_5ForCausalLM"
SEED = 45
# Small but real: 2 decoder layers, grouped-query attention (2 query heads, 1 KV head), head_dim 64
# (a size vLLM's CPU attention supports), ERNIE's rope theta and norm eps (the config's defaults).
DIMENSIONS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
README = f"""# tiny-ernie: RANDOM WEIGHTS — an architecture check, not a model

Built by `python -m agent.model prepare --model {NAME}` (agent/tiny_ernie.py): transformers'
`Ernie4_5Config` with small dimensions, architecture `{ARCHITECTURE}`, weights drawn at random
(seed {SEED}), the tokenizer of the embedded SmolLM2-135M-Instruct. vLLM runs its ERNIE-4.5 code path
on it; the text it generates is noise. The real model: `--model baidu/ERNIE-4.5-0.3B-PT` on a GPU.
"""


def model_dir() -> Path:
    return cache_dir() / "models" / MODEL_DIR_NAME


def tiny_config(tokenizer_vocab: int, bos: int | None, eos: int | None, pad: int | None) -> Any:
    """The checkpoint's config: the real `Ernie4_5Config` class, small dimensions, the tokenizer's ids."""
    from transformers import Ernie4_5Config

    config = Ernie4_5Config(
        vocab_size=tokenizer_vocab,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        architectures=[ARCHITECTURE],
        **DIMENSIONS,
    )
    config.dtype = CHECKPOINT_DTYPE
    return config


def build(work: Path, progress: Progress = print) -> str:
    """Write the random-weight checkpoint into `work` (the embedded model is prepared first: its tokenizer)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local: never ask a hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    tokenizer_dir = prepare_default_model(progress=progress)
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoTokenizer, Ernie4_5ForCausalLM, GenerationConfig
    except ImportError as e:
        raise ModelPrepError(
            f"missing Python package or class ({getattr(e, 'name', None) or e}): transformers >= 4.54 has "
            "ERNIE-4.5; run `scripts/install.sh core`"
        ) from e
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    progress(
        f"building {NAME}: {ARCHITECTURE} with RANDOM weights (seed {SEED}; an architecture check, "
        f"not a model), {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size}"
    )
    torch.manual_seed(SEED)
    model = Ernie4_5ForCausalLM(config)  # type: ignore[no-untyped-call]
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses shared tensors
    dtype = getattr(torch, CHECKPOINT_DTYPE)
    save_file(
        {k: v.to(dtype).contiguous() for k, v in state.items()}, str(work / WEIGHTS_FILE), metadata={"format": "pt"}
    )
    out = config.to_dict()
    out.pop("_name_or_path", None)
    (work / "config.json").write_text(json.dumps(out, indent=2, sort_keys=True))
    GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(work)
    tokenizer.save_pretrained(work)
    (work / "README.md").write_text(README)
    params = sum(v.numel() for v in state.values())
    progress(f"wrote {params / 1e6:.1f} M random parameters ({CHECKPOINT_DTYPE}) and the tokenizer")
    return f"random weights (seed {SEED}), {ARCHITECTURE}, tokenizer of {tokenizer_dir.name}"


def prepare_tiny_ernie(dest: Path | None = None, progress: Progress = print) -> Path:
    """Build tiny-ernie in `dest` (default: `model_dir()`) unless done (idempotent, cached)."""
    return build_once(Path(dest) if dest is not None else model_dir(), lambda work: build(work, progress), progress)
