"""DeepSeek-V4 checkpoints through daulat's one loader and writer, both ways with transformers: what
`save_model` writes loads in `DeepseekV4ForCausalLM.from_pretrained` with no missing or unexpected
tensor and the same logits; transformers' `save_pretrained` (one file or sharded) loads through
`load_model`; a damaged checkpoint is one line naming the tensor; a bfloat16 load keeps V4's float32
tensors in float32, exactly as a cast of the model does."""

import json

import pytest
import torch
from conftest import require
from safetensors.torch import load_file, save_file

require("transformers")
from test_v4 import CONFIGS, _pair, _perturb  # noqa: E402
from transformers import DeepseekV4ForCausalLM  # noqa: E402

from daulat.checkpoint import load_checkpoint, load_model, save_model  # noqa: E402
from daulat.errors import DaulatError  # noqa: E402
from daulat.model_v4 import FP32_TENSORS, DeepseekV4, ModelConfigV4  # noqa: E402


def _random_v4(name: str, seed: int) -> DeepseekV4:
    config = ModelConfigV4(**CONFIGS[name][0])
    model = DeepseekV4(config).eval()
    _perturb(model, config.n_routed_experts, seed)
    return model


def _ids(model, seed: int, B: int = 2, T: int = 37) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["mix-hc2-hash", "sigmoid-tied-4groups", "yarn-compress"])
def test_save_model_loads_in_transformers_and_back_with_the_same_logits(tmp_path, name):
    model = _random_v4(name, seed=3)
    save_model(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v4" and config["architectures"] == ["DeepseekV4ForCausalLM"]
    hf, info = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager",
                                                     output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    loaded = load_checkpoint(tmp_path / "ckpt").model
    assert type(loaded) is DeepseekV4 and loaded.config == model.config
    ids = _ids(model, seed=4)
    with torch.no_grad():
        ours = model(ids)
        assert ours.abs().max() > 0.05
        assert (hf.eval()(ids).logits - ours).abs().max() <= 1e-4
        assert torch.equal(loaded(ids), ours)


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_transformers_save_pretrained_loads_through_load_model(tmp_path, shard):
    config, hf = _pair(CONFIGS["deep-pro-like"][0])
    _perturb(hf, config.n_routed_experts, seed=5)
    hf.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "hf" / ("model.safetensors.index.json" if shard else "model.safetensors")).is_file()
    model = load_model(tmp_path / "hf")
    assert type(model) is DeepseekV4 and model.config == config
    ids = _ids(model, seed=6, B=1, T=36)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4


def _damage(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


DAMAGE = {
    "drop": (lambda t: t.pop("layers.1.attn.compressor.ape"), "missing tensor 'layers.1.attn.compressor.ape'"),
    "drop-expert": (lambda t: t.pop("layers.2.ffn.experts.3.w3.weight"),
                    "missing tensor 'layers.2.ffn.experts.3.w3.weight'.*n_routed_experts = 8"),
    "extra": (lambda t: t.__setitem__("layers.0.attn.extra_proj.weight", torch.zeros(4, 4)),
              "unexpected tensor 'layers.0.attn.extra_proj.weight'"),
    "extra-expert": (lambda t: t.__setitem__("layers.1.ffn.experts.8.w1.weight", torch.zeros(32, 64)),
                     "unexpected tensor 'layers.1.ffn.experts.8.w1.weight'"),
    "extra-layer": (lambda t: t.__setitem__("layers.3.attn_norm.weight", torch.zeros(64)),
                    "unexpected tensor 'layers.3.attn_norm.weight'"),
    "reshape": (lambda t: t.__setitem__("layers.1.attn.wq_a.weight", t["layers.1.attn.wq_a.weight"][:-1].clone()),
                r"tensor 'layers.1.attn.wq_a.weight' has shape \(31, 64\), config.json implies \(32, 64\)"),
    "float-table": (lambda t: t.__setitem__("layers.0.ffn.gate.tid2eid", t["layers.0.ffn.gate.tid2eid"].float()),
                    "'layers.0.ffn.gate.tid2eid' has dtype F32: expected an integer table"),
    "integer-weight": (lambda t: t.__setitem__("layers.0.attn.wq_a.weight", t["layers.0.attn.wq_a.weight"].long()),
                       "'layers.0.attn.wq_a.weight' has dtype I64: weights must be floating point"),
    "table-out-of-range": (lambda t: t["layers.0.ffn.gate.tid2eid"].__setitem__((5, 1), 8),
                           "'layers.0.ffn.gate.tid2eid' holds expert ids outside 0..7"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_v4_checkpoint_is_one_line_naming_the_tensor(tmp_path, damage):
    edit, words = DAMAGE[damage]
    path = save_model(_random_v4("mix-hc2-hash", seed=7), tmp_path / "ckpt")
    _damage(path, edit)
    with pytest.raises(DaulatError, match=words) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_a_v4_quantization_config_is_read_but_fp8_resident_is_refused_in_one_line(tmp_path):
    """V4's FP8 + MXFP4 releases load dequantized (tests/test_v4_quantized.py); a tensor is dequantized
    exactly when it is stored so, so a high-precision checkpoint under a quantization_config loads as it
    is. Holding V4 FP8-resident is not supported yet, quantized or not."""
    model = _random_v4("mix-hc2-hash", seed=7)
    path = save_model(model, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization,
                                                  "expert_dtype": "fp4"}))
    ids = _ids(model, seed=10)
    with torch.no_grad():
        assert torch.equal(load_model(path)(ids), model(ids))
    for quantized in (True, False):
        if not quantized:
            (path / "config.json").write_text(json.dumps(config))
        with pytest.raises(DaulatError, match="deepseek_v4 cannot be held FP8-resident yet") as e:
            load_model(path, fp8_resident=True)
        assert "\n" not in str(e.value)


def test_bf16_load_keeps_v4s_float32_tensors_as_a_cast_does(tmp_path):
    """Hyper-connections, sinks, compressor position biases and router correction biases stay float32
    (transformers keeps them so too); everything else is bfloat16; the load equals a cast exactly."""
    model = _random_v4("mix-hc2-hash", seed=8)
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    cast = model.to(torch.bfloat16)
    kept = {name for name, t in loaded.state_dict().items() if t.dtype == torch.float32}
    assert kept == {name for name in loaded.state_dict() if any(k in "." + name for k in FP32_TENSORS)}
    assert {"layers.1.mlp.gate.e_score_correction_bias", "layers.0.attn_hc.fn", "hc_head.hc_fn",
            "layers.0.self_attn.sinks", "layers.1.self_attn.compressor.position_bias"} <= kept
    assert loaded.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    assert loaded.layers[0].mlp.gate.tid2eid.dtype == torch.long
    for name, tensor in cast.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = _ids(model, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(ids), cast(ids))
