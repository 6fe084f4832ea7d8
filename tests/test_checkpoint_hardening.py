"""A checkpoint directory is untrusted input: every bad one is a one-line error with exit code 2, found
before anything is allocated, through the commands a user runs (`daulat inspect`, `daulat chat -p`)."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from daulat.checkpoint import load_model, save_model
from daulat.cli import main
from daulat.errors import DaulatError
from daulat.model import DeepseekV3, ModelConfig
from daulat.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
             n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["The cat sat on the mat. 12 + 34 = 46."] * 30, 300)


@pytest.fixture()
def ckpt(tmp_path, tokenizer) -> Path:
    torch.manual_seed(0)
    return save_model(DeepseekV3(ModelConfig(**SMALL)), tmp_path / "ckpt", tokenizer=tokenizer)


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`daulat ARGV` in a fresh process (slow tests: the probe's own way in)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "daulat.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def daulat(capsys):
    """`daulat ARGV` through the CLI's entry point in this process: (exit code, stderr) as a process."""
    def run(*argv: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, captured.out, captured.err)
    return run


def _edit_config(ckpt: Path, **changes) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))


def _edit_weights(ckpt: Path, edit) -> None:
    tensors = load_file(ckpt / WEIGHTS)
    edit(tensors)
    save_file(tensors, ckpt / WEIGHTS)


# ------------------------------------------------------------------------------ absurd config values


@pytest.mark.parametrize("field,value,words", [
    ("num_hidden_layers", 10**6, ["missing tensors of layer 2", "num_hidden_layers = 1000000"]),
    ("n_routed_experts", 10**9, ["missing tensor 'model.layers.1.mlp.experts.4.", "n_routed_experts = 1000000000"]),
])
def test_absurd_counts_fail_fast_in_one_line_before_allocating(ckpt, field, value, words, daulat):
    _edit_config(ckpt, **{field: value})
    for argv in (["inspect", str(ckpt)], ["chat", str(ckpt), "-p", "hi", "--max-tokens", "2"]):
        start = time.monotonic()
        proc = daulat(*argv)
        _one_line(proc, *words)
        assert "MemoryError" not in proc.stderr
        assert time.monotonic() - start < 30  # the probe saw minutes and several GB


@pytest.mark.slow
def test_absurd_counts_through_a_fresh_process_stay_small_and_fast(ckpt):
    """As the probe ran it: a new `daulat inspect` process, its peak memory and time measured."""
    _edit_config(ckpt, num_hidden_layers=10**6, n_routed_experts=10**9)
    start = time.monotonic()
    proc = _cli("inspect", str(ckpt))
    _one_line(proc, "config.json says")
    assert time.monotonic() - start < 60
    import resource

    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2 * 2**20  # KiB: under 2 GiB


def test_a_vocab_far_beyond_the_weights_is_a_shape_error_not_an_allocation(ckpt, daulat):
    _edit_config(ckpt, vocab_size=10**11)
    _one_line(daulat("inspect", str(ckpt)), "model.embed_tokens.weight", "has shape (300, 32)")


# ------------------------------------------------------------------------------ structurally wrong JSON


@pytest.mark.parametrize("case,words", [
    ("config_is_a_list", ["config.json", "expected a JSON object, got array"]),
    ("rope_parameters_is_a_list", ["'rope_parameters' must be an object"]),
    ("yarn_factor_is_a_string", ["'rope_parameters.factor'", "expected a number"]),
    ("layers_is_a_string", ["'num_hidden_layers'", "expected int"]),
    ("deep_nesting", ["config.json", "nested too deeply"]),
    ("index_weight_map_is_a_list", ["model.safetensors.index.json", "'weight_map' must be"]),
])
def test_structurally_wrong_json_is_one_line(ckpt, case, words, daulat):
    config = json.loads((ckpt / "config.json").read_text())
    if case == "config_is_a_list":
        (ckpt / "config.json").write_text(json.dumps([config]))
    elif case == "rope_parameters_is_a_list":
        _edit_config(ckpt, rope_parameters=[{"rope_type": "default"}])
    elif case == "yarn_factor_is_a_string":
        _edit_config(ckpt, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": "4",
                                            "original_max_position_embeddings": 32})
    elif case == "layers_is_a_string":
        _edit_config(ckpt, num_hidden_layers="2")
    elif case == "deep_nesting":
        (ckpt / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        (ckpt / WEIGHTS).rename(ckpt / "model-00001-of-00001.safetensors")
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model-00001-of-00001"]}))
    _one_line(daulat("inspect", str(ckpt)), *words)


# ------------------------------------------------------------------------------ suspicious content


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(ckpt, value, daulat):
    name = "model.layers.1.mlp.experts.2.down_proj.weight"

    def poison(tensors):
        tensors[name][3, 1] = value

    _edit_weights(ckpt, poison)
    for argv in (["inspect", "--verify", str(ckpt)], ["chat", str(ckpt), "-p", "hi", "--max-tokens", "2"]):
        _one_line(daulat(*argv), name, "NaN or Inf")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_and_bool_weights_are_refused_naming_the_tensor(ckpt, dtype, daulat):
    name = "model.layers.0.self_attn.o_proj.weight"

    def retype(tensors):
        tensors[name] = tensors[name].to(dtype)

    _edit_weights(ckpt, retype)
    with pytest.raises(DaulatError, match=f"'{name}' has dtype .*: weights must be floating point"):
        load_model(ckpt)
    _one_line(daulat("chat", str(ckpt), "-p", "hi", "--max-tokens", "2"), name, "floating point")


@pytest.mark.parametrize("extra", [
    "model.layers.999.mlp.experts.0.gate_proj.weight",  # a layer far beyond num_hidden_layers
    "model.layers.1.mlp.experts.1000.up_proj.weight",  # an expert far beyond n_routed_experts
    "model.layers.2.input_layernorm.weight",  # the next layer (no MTP declared)
    "model.layers.0.self_attn.extra_proj.weight",  # an unknown name inside a real layer
    "transformer.h.0.attn.weight",  # another architecture's name
])
def test_every_unexpected_name_is_refused_alike(ckpt, extra, daulat):
    _edit_weights(ckpt, lambda tensors: tensors.__setitem__(extra, torch.zeros(4, 4)))
    _one_line(daulat("inspect", str(ckpt)), "unexpected tensor", extra)


def _shard(ckpt: Path, shard_name: str) -> None:
    """Turn the checkpoint into a one-shard index naming `shard_name` for every tensor."""
    names = list(load_file(ckpt / WEIGHTS))
    (ckpt / WEIGHTS).rename(ckpt / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}
    index["weight_map"][names[0]] = shard_name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["absolute", "parent", "nested_parent", "symlink_out"])
def test_index_entries_outside_the_checkpoint_are_refused(ckpt, tmp_path, where, daulat):
    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(2)}, outside)
    if where == "symlink_out":
        (ckpt / "link.safetensors").symlink_to(outside)
    name = {"absolute": str(outside), "parent": "../outside.safetensors",
            "nested_parent": "sub/../../outside.safetensors", "symlink_out": "link.safetensors"}[where]
    _shard(ckpt, name)
    _one_line(daulat("inspect", str(ckpt)), "points outside the checkpoint")


def test_a_sharded_checkpoint_loads_and_an_index_that_lies_is_refused(ckpt, daulat):
    reference = load_model(ckpt)
    tensors = load_file(ckpt / WEIGHTS)
    names = sorted(tensors)
    half = len(names) // 2
    (ckpt / WEIGHTS).unlink()
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, ckpt / file)
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_model(ckpt)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    index["weight_map"][names[0]] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_line(daulat("inspect", str(ckpt)), names[0], "is not in model-00002-of-00002.safetensors")


# ------------------------------------------------------------------------------ paths


def test_missing_path_and_a_folder_that_is_not_a_checkpoint(tmp_path, daulat):
    _one_line(daulat("inspect", str(tmp_path / "nope")), "does not exist")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    _one_line(daulat("inspect", str(tmp_path / "notes")), "not a checkpoint")
    _one_line(daulat("chat", str(tmp_path / "notes"), "-p", "hi"), "not a checkpoint")
    _one_line(daulat("chat", str(tmp_path / "nope"), "-p", "hi"), "does not exist")


# ------------------------------------------------------------------------------ a full disk


def _tiny_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_during_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, daulat):
    disk = tmp_path / "disk"
    mounted = _tiny_tmpfs(disk, "160k")
    try:
        small = DeepseekV3(ModelConfig(**{**SMALL, "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
                                          "first_k_dense_replace": 0, "n_routed_experts": 2}))
        save_model(small, disk / "ckpt")  # fits: the previous checkpoint
        before = sorted(p.name for p in (disk / "ckpt").iterdir())
        big = DeepseekV3(ModelConfig(**SMALL))  # about 0.5 MB of float32: does not fit
        if not mounted:  # no tmpfs (not root): the writer fails as a full disk makes it fail
            import daulat.checkpoint as checkpoint

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(checkpoint, "save_file", full)
        with pytest.raises(DaulatError, match="cannot write checkpoint .*ckpt: no space left on device"):
            save_model(big, disk / "ckpt")
        assert sorted(p.name for p in disk.iterdir()) == ["ckpt"]  # no temporary directory left behind
        assert sorted(p.name for p in (disk / "ckpt").iterdir()) == before
        assert load_model(disk / "ckpt").config.hidden_size == 16
        if mounted:  # and through the CLI: `daulat init` onto the full disk
            _one_line(daulat("init", "--preset", "micro", "--out", str(disk / "ckpt")), "no space left on device")
            assert load_model(disk / "ckpt").config.hidden_size == 16
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
