"""Open weights as published: FP8 block-scaled checkpoints (DeepSeek-V3/R1, Kimi-K2, V3.2's power-of-two
scales), sharded through an index, read into the working dtype; checked against DeepSeek's block
semantics written out loop by loop, and against transformers' own FP8 reader."""

import json
import math
from pathlib import Path

import pytest
from conftest import require
import torch
from safetensors.torch import load_file, save_file

from daulat.checkpoint import load_model, save_model, to_hf_state_dict
from daulat.cli import main
from daulat.errors import DaulatError
from daulat.export import fp8_weights, vllm_fit
from daulat.model import DeepseekV3, ModelConfig
from daulat.quant import BlockFP8, dequantize, quantize

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=2, kv_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            q_lora_rank=48, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64)


def _reference_dequant(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """DeepSeek-V3's weight_dequant, block by block: W[i, j] = q[i, j] * s[i // bm, j // bn]."""
    bm, bn = block
    out = torch.empty(q.shape, dtype=torch.float32)
    for bi in range(math.ceil(q.shape[0] / bm)):
        for bj in range(math.ceil(q.shape[1] / bn)):
            rows, cols = slice(bi * bm, (bi + 1) * bm), slice(bj * bn, (bj + 1) * bn)
            out[rows, cols] = q[rows, cols].float() * s[bi, bj].float()
    return out


@pytest.mark.parametrize("shape", [(576, 200), (128, 256), (100, 7), (3, 130, 257)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_block_math_matches_deepseeks_semantics_on_ragged_edges(shape, scale_fmt):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])  # columns of very different size
    q, s = quantize(w, (128, 128), scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    if scale_fmt == "ue8m0":
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two
    got = dequantize(q, s, (128, 128), slab_bytes=128 * 4 * shape[-1])  # slabs of one block row: seams covered
    flat_q, flat_s = q.reshape(-1, *shape[-2:]), s.reshape(-1, *s.shape[-2:])
    want = torch.stack([_reference_dequant(a, b, (128, 128)) for a, b in zip(flat_q, flat_s)]).reshape(shape)
    assert torch.equal(got, want)
    assert (got - w).abs().max() <= w.abs().max() * 2 ** -3  # e4m3 keeps 3 mantissa bits
    # 576 rows = 4.5 blocks: the last scale row covers 64 rows and only them
    if shape == (576, 200):
        assert torch.equal(got[512:, :128], q[512:, :128].float() * s[4, 0])


def _model(seed=0, **overrides) -> DeepseekV3:
    torch.manual_seed(seed)
    model = DeepseekV3(ModelConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.2)
    return model


def _release(model: DeepseekV3, path: Path, spec: BlockFP8 = BlockFP8(), shards: int = 1,
             model_type: str = "deepseek_v3", fused: bool = False) -> dict[str, torch.Tensor]:
    """Write `model` as an open-weight FP8 release would be laid out; returns its tensors."""
    path.mkdir(parents=True)
    tensors, extra = fp8_weights(to_hf_state_dict(model)[0], spec)
    config = {**model.config.to_hf_dict(), **extra, "model_type": model_type}
    if fused:  # transformers 5's fused expert layout is read too (kept unquantized here, as it writes them)
        for layer in range(model.config.first_k_dense_replace, model.config.num_hidden_layers):
            mlp = model.layers[layer].mlp
            for kind in ("gate_proj", "up_proj", "down_proj"):
                for e in range(model.config.n_routed_experts):
                    key = f"model.layers.{layer}.mlp.experts.{e}.{kind}.weight"
                    tensors.pop(key), tensors.pop(key + "_scale_inv")
            tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = mlp.gate_up_proj.detach().bfloat16()
            tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = mlp.down_proj.detach().bfloat16()
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {name: files[i * shards // len(names)] for i, name in enumerate(names)}
    for file in files:
        save_file({n: tensors[n] for n in names if weight_map[n] == file}, path / file, metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def _dequantized_model(model: DeepseekV3, tensors: dict, block, path: Path) -> DeepseekV3:
    """The model with every weight replaced by the reference dequantization of what the release holds
    (written as a float32 checkpoint, whose loading tests/test_parity.py checks against transformers)."""
    reference = {}
    for name, t in tensors.items():
        if not name.endswith("_scale_inv"):
            scale = tensors.get(name + "_scale_inv")
            reference[name] = _reference_dequant(t, scale, block) if scale is not None else t.float()
    path.mkdir()
    save_file(reference, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    return load_model(path)


def _same_logits(a: DeepseekV3, b: DeepseekV3) -> float:
    ids = torch.randint(0, BASE["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return (a(ids) - b(ids)).abs().max().item()


@pytest.mark.parametrize("case", ["aligned_8", "ragged_64", "ue8m0_sharded", "ue8m0_as_e8m0_dtype", "kimi_k2_fused"])
def test_fp8_releases_load_with_the_dequantized_models_logits(case, tmp_path):
    spec, shards, model_type, fused = {
        "aligned_8": (BlockFP8((8, 8)), 1, "deepseek_v3", False),  # every size a whole number of blocks
        "ragged_64": (BlockFP8((64, 64)), 1, "deepseek_v3", False),  # 96, 40, 48: ragged edge blocks everywhere
        "ue8m0_sharded": (BlockFP8((32, 32), "ue8m0"), 3, "deepseek_v3", False),
        "ue8m0_as_e8m0_dtype": (BlockFP8((32, 32), "ue8m0"), 1, "deepseek_v3", False),  # scales stored 1 byte each
        "kimi_k2_fused": (BlockFP8((32, 32)), 2, "kimi_k2", True),
    }[case]
    model = _model()
    tensors = _release(model, tmp_path / "fp8", spec, shards, model_type, fused)
    if case == "ue8m0_as_e8m0_dtype":
        shard = tmp_path / "fp8" / "model-00001-of-00001.safetensors"
        tensors = {k: v.to(torch.float8_e8m0fnu) if k.endswith("_scale_inv") else v for k, v in tensors.items()}
        save_file(tensors, shard)
        assert load_file(shard)[W + "_scale_inv"].dtype == torch.float8_e8m0fnu
    loaded = load_model(tmp_path / "fp8")
    expected = _dequantized_model(model, tensors, spec.block, tmp_path / "reference")
    for (name, got), want in zip(loaded.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(got, want), name
    assert _same_logits(loaded, expected) <= 1e-4
    assert _same_logits(loaded, model) < 0.5  # and close to the unquantized model
    bf16 = load_model(tmp_path / "fp8", dtype=torch.bfloat16)
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


@pytest.mark.slow
def test_transformers_fp8_reader_gives_the_same_tensors_and_logits(tmp_path):
    """transformers (on CPU it dequantizes FP8 at load) against daulat on every tensor of an FP8 export.
    Every size is a whole number of 128x128 blocks: transformers derives the block from the scale grid
    (rows // scale rows), which is DeepSeek's semantics only then (for 192 rows in two blocks it uses
    blocks of 96, not 128 + 64); ragged sizes are checked against DeepSeek's loop above instead."""
    transformers = require("transformers")
    require("accelerate")
    aligned = dict(BASE, vocab_size=256, hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
                   q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=128, v_head_dim=64)
    torch.manual_seed(0)
    model = DeepseekV3(ModelConfig(**aligned)).eval()
    save_model(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "hf", "--dtype", "fp8", "--out",
                 str(tmp_path / "fp8")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    ours = load_model(tmp_path / "fp8")
    theirs = hf.state_dict()
    mine, _ = to_hf_state_dict(ours)
    for layer in range(aligned["first_k_dense_replace"], aligned["num_hidden_layers"]):  # theirs: fused experts
        prefix = f"model.layers.{layer}.mlp"
        mine[f"{prefix}.experts.gate_up_proj"] = ours.layers[layer].mlp.gate_up_proj.detach()
        mine[f"{prefix}.experts.down_proj"] = ours.layers[layer].mlp.down_proj.detach()
    quantized = [k for k in load_file(tmp_path / "fp8" / "model.safetensors") if k.endswith("_scale_inv")]
    assert len(quantized) >= 15
    for name, tensor in theirs.items():
        assert torch.equal(tensor, mine[name]), name
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------ corruption classes


def _corrupt(tmp_path, edit_tensors=None, edit_config=None) -> Path:
    path = tmp_path / "fp8"
    _release(_model(), path, BlockFP8((32, 32)))
    shard = path / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    if edit_tensors:
        edit_tensors(tensors)
        index = json.loads((path / "model.safetensors.index.json").read_text())
        index["weight_map"] = {n: shard.name for n in tensors}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
        save_file(tensors, shard)
    if edit_config:
        config = json.loads((path / "config.json").read_text())
        edit_config(config)
        (path / "config.json").write_text(json.dumps(config))
    return path


W = "model.layers.0.self_attn.kv_b_proj.weight"


@pytest.mark.parametrize("case,words", [
    ("weight_without_scale", [W, "float8 without its", "_scale_inv"]),
    ("scale_without_weight", ["scale", W + "_scale_inv", "has no weight"]),
    ("scale_grid_wrong", [W + "_scale_inv", "has shape (1, 1)", "needs (2, 2)"]),
    ("scale_block_changed", ["_scale_inv", "blocks of 128x128", "needs (1, 1)"]),
    ("scale_of_a_bf16_weight", [W + "_scale_inv", "not float8"]),
    ("gptq", ["quant_method 'gptq' is not supported", "fp8"]),
    ("awq", ["quant_method 'awq' is not supported"]),
    ("compressed-tensors", ["quant_method 'compressed-tensors' is not supported"]),
    ("fmt_e5m2", ["fmt 'e5m2' is not supported"]),
    ("nan_scale", [W, "NaN or Inf"]),
])
def test_broken_fp8_checkpoints_are_one_line_errors(case, words, tmp_path, capsys):
    edits = {
        "weight_without_scale": (lambda t: t.pop(W + "_scale_inv"), None),
        "scale_without_weight": (lambda t: t.pop(W), None),
        "scale_grid_wrong": (lambda t: t.__setitem__(W + "_scale_inv", torch.ones(1, 1)), None),
        "scale_block_changed": (None, lambda c: c["quantization_config"].update(weight_block_size=[128, 128])),
        "scale_of_a_bf16_weight": (lambda t: t.__setitem__(W, t[W].bfloat16()), None),
        "gptq": (None, lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4})),
        "awq": (None, lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4})),
        "compressed-tensors": (None, lambda c: c.update(quantization_config={"quant_method": "compressed-tensors"})),
        "fmt_e5m2": (None, lambda c: c["quantization_config"].update(fmt="e5m2")),
        "nan_scale": (lambda t: t[W + "_scale_inv"].__setitem__((0, 0), float("nan")), None),
    }[case]
    path = _corrupt(tmp_path, *edits)
    assert main(["inspect", "--verify", str(path)]) == 2  # --verify: the values too (a NaN scale)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for word in words:
        assert word in err[0], err[0]


# ------------------------------------------------------------------------------ export both ways


def test_export_fp8_and_back_to_bf16(tmp_path, capsys):
    model = _model()
    save_model(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "hf", "--dtype", "fp8", "--out",
                 str(tmp_path / "fp8")]) == 0
    out = capsys.readouterr().out
    assert "vLLM: does not fit vLLM's MLA kernels (kv_lora_rank + qk_rope_head_dim = 48" in out
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    assert config["topk_method"] == "noaux_tc" and config["scoring_func"] == "sigmoid"
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    assert tensors[W].dtype == torch.float8_e4m3fn and tensors[W + "_scale_inv"].dtype == torch.float32
    for stays in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                  "model.layers.0.input_layernorm.weight"):
        assert tensors[stays].dtype == torch.bfloat16, stays
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert _same_logits(load_model(tmp_path / "fp8"), model) < 0.5

    assert main(["export", str(tmp_path / "fp8"), "--format", "hf", "--dtype", "bf16", "--out",
                 str(tmp_path / "bf16")]) == 0
    back = load_file(tmp_path / "bf16" / "model.safetensors")
    assert not any(k.endswith("_scale_inv") for k in back) and back[W].dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert torch.equal(back[W], dequantize(tensors[W], tensors[W + "_scale_inv"], (128, 128), torch.bfloat16))


def test_vllm_fit_is_stated():
    fits = ModelConfig(**{**BASE, "kv_lora_rank": 512, "qk_rope_head_dim": 64})
    gpu_only = ModelConfig(**{**BASE, "kv_lora_rank": 448, "qk_rope_head_dim": 64})
    assert vllm_fit(fits).startswith("fits vLLM's MLA kernels on GPU and CPU")
    assert vllm_fit(gpu_only).startswith("fits vLLM's MLA kernels on GPU only")
    assert vllm_fit(ModelConfig(**BASE)).startswith("does not fit")


def test_an_fp8_checkpoint_cannot_become_gguf_fp8(tmp_path, capsys):
    save_model(_model(), tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "gguf", "--dtype", "fp8", "--out",
                 str(tmp_path / "x.gguf")]) == 2
    assert "fp8 is for --format hf" in capsys.readouterr().err


# ------------------------------------------------------------------------------ streaming load


_MEASURE = """
import sys, torch
from pathlib import Path
from daulat.checkpoint import load_model

def kib(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))

load_model(sys.argv[2], dtype=torch.bfloat16)  # lazy imports (torch._dynamo, pulled in by nn.init) done first
baseline = kib("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")  # the peak counter starts again here
model = load_model(sys.argv[1], dtype=torch.bfloat16)
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print((kib("VmHWM:") - baseline) * 1024 / size)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fp8", [False, True])
def test_streaming_load_peaks_within_1_2x_of_the_result(tmp_path, fp8):
    """Tensors are read one at a time into the target dtype: resident memory above the baseline stays
    within 1.2x of the loaded model's size (bf16 and FP8 checkpoints, loaded into bf16)."""
    import os
    import subprocess
    import sys

    shape = dict(BASE, vocab_size=16384, hidden_size=768, intermediate_size=2048, moe_intermediate_size=256,
                 num_hidden_layers=6, n_routed_experts=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
                 qk_rope_head_dim=64, v_head_dim=64, num_attention_heads=4)
    for name, layers in (("warm", 2), ("big", 6)):
        torch.manual_seed(0)
        model = DeepseekV3(ModelConfig(**{**shape, "num_hidden_layers": layers})).to(torch.bfloat16)
        weights, extra = fp8_weights(to_hf_state_dict(model)[0]) if fp8 else (None, None)
        save_model(model, tmp_path / name, weights=weights, extra_config=extra)
        del model
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "big"), str(tmp_path / "warm")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratio = float(proc.stdout.strip().splitlines()[-1])
    assert ratio <= 1.2, ratio


# ------------------------------------------------------------------------------ FP8-resident linear


def test_fp8_linear_stays_one_byte_and_computes_the_dequantized_product():
    from daulat.quant import FP8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(200, 576, bias=True)  # 4.5 row blocks, ragged column block
    layer = FP8Linear.from_linear(linear)
    layer.slab_rows = 128  # several slabs, the last one ragged
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.element_size() == 1
    x = torch.randn(3, 5, 200, requires_grad=True)
    y = layer(x)
    w = _reference_dequant(layer.weight, layer.weight_scale_inv, (128, 128))
    assert torch.allclose(y, x @ w.T + linear.bias, atol=1e-5, rtol=1e-5)
    y.sum().backward()  # adapters train through it: the input gets a gradient, the base has none
    assert x.grad is not None and not any(p.requires_grad for p in layer.parameters())
    with pytest.raises(DaulatError, match="scale grid"):
        FP8Linear(layer.weight, torch.ones(1, 1))
