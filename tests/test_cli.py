"""The CLI: help, version, inspect, and one-line errors with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from daulat.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in (ROOT / "README.md").read_text()


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "daulat" in capsys.readouterr().out
    assert main([]) == 0
    assert "inspect" in capsys.readouterr().out


def test_init_then_inspect_prints_counts_and_cache(tmp_path, capsys):
    assert main(["init", "--preset", "micro", "--out", str(tmp_path / "m")]) == 0
    assert main(["inspect", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "active per token" in out and "MLA latent" in out
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    import json

    facts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert facts["parameters_active_per_token"] < facts["parameters_total"]
    # micro: 2 layers x (32 + 8) numbers x 2 bytes, vs 2 layers x 2 heads x (24 + 16) x 2 bytes
    assert facts["kv_cache_bytes_per_token_bf16"]["mla_latent"] == 2 * 40 * 2
    assert facts["kv_cache_bytes_per_token_bf16"]["full_per_head_kv"] == 2 * 2 * 40 * 2


def test_inspect_reads_only_headers_unless_asked_to_verify(tmp_path, capsys):
    """A 700 GB release is described from config.json and the tensor headers; --verify reads the values."""
    import struct

    assert main(["init", "--preset", "micro", "--out", str(tmp_path / "m")]) == 0
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # the tensors' bytes begin after the JSON header
    data[start:] = b"\xff" * (len(data) - start)  # every float32 value a NaN; the header untouched
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m")]) == 0 and "active per token" in capsys.readouterr().out
    assert main(["inspect", "--verify", str(tmp_path / "m")]) == 2
    assert "NaN or Inf" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["tiny-v32", "tiny-v4"])
def test_inspect_describes_v32_and_v4_checkpoints(preset, tmp_path, capsys):
    import json

    assert main(["init", "--preset", preset, "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kv = facts["kv_cache_bytes_per_token_bf16"]
    assert facts["parameters_active_per_token"] < facts["parameters_total"]
    if preset == "tiny-v4":  # 2 CSA layers (48 + 32) / 4 and 1 HCA layer 48 / 16 numbers per token, bf16
        assert "DeepseekV4" in facts["architecture"] and kv["compressed"] == (2 * 80 / 4 + 48 / 16) * 2
        assert kv["full_per_head_kv"] == 4 * 2 * 4 * 48 * 2 and "not checked" in facts["vllm"]
    else:
        assert "DeepseekV32" in facts["architecture"] and kv["indexer_keys"] > 0
    assert main(["inspect", str(tmp_path / "m")]) == 0 and "KV cache per token" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("argv,words", [
    (["inspect", "/no/such/dir"], "does not exist"),
    (["init", "--preset", "nope", "--out", "x"], "unknown preset"),
    (["init", "--out", "x", "model.n_group=3"], "n_group"),
    (["init", "--out", "x", "model.nonsense=1"], "unknown key model.nonsense"),
    (["init", "--out", "x", "model.hidden_size=big"], "model.hidden_size"),
])
def test_errors_are_one_line_with_exit_code_2(argv, words, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "daulat.cli", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr


def test_corrupt_checkpoint_names_the_file_and_tensor(tmp_path, capsys):
    assert main(["init", "--preset", "micro", "--out", str(tmp_path / "m")]) == 0
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    assert main(["inspect", str(tmp_path / "m")]) == 2
    assert "model.safetensors" in capsys.readouterr().err

    from safetensors.torch import load_file, save_file

    main(["init", "--preset", "micro", "--out", str(tmp_path / "m")])
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, weights)
    assert main(["inspect", str(tmp_path / "m")]) == 2
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in capsys.readouterr().err

    main(["init", "--preset", "micro", "--out", str(tmp_path / "m")])
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:10]
    save_file(tensors, weights)
    assert main(["inspect", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "model.norm.weight" in err and "shape" in err


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    """A failure in the middle of a save leaves the previous checkpoint whole and no temp dirs."""
    import torch

    import daulat.checkpoint as ckpt
    from daulat.model import DeepseekV3, ModelConfig

    model = DeepseekV3(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                   v_head_dim=8, first_k_dense_replace=1))
    ckpt.save_model(model, tmp_path / "c", info={"n": 1})
    before = (tmp_path / "c" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "write_json", boom)
    with torch.no_grad():
        model.norm.weight.add_(1)
    with pytest.raises(RuntimeError):
        ckpt.save_model(model, tmp_path / "c", info={"n": 2})
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_overrides_may_stand_between_options(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["init", "--out", str(out), "model.num_hidden_layers=3", "--seed", "1", "model.hidden_size=96"]) == 0
    assert main(["inspect", str(out), "--json"]) == 0
    import json

    facts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert facts["layers"] == 3 and facts["hidden_size"] == 96
