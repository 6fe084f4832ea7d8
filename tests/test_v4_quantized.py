"""DeepSeek-V4's published quantized layout (daulat/quant.py's docstring): FP8 linears with power-of-two
block scales under `<module>.scale`, routed experts packed MXFP4 (two e2m1 values a byte, one power of
two per 32 values of a row), compressors and indexer projections in BF16. A small random V4 written so
loads through `load_model` with the logits of the model whose weights are the dequantization written
out value by value here; transformers' own `from_pretrained` of the same directory (which dequantizes
on a machine without a GPU) gives the same logits; a damaged release is one line naming the tensor."""

import json
import re

import pytest
import torch
from conftest import require
from safetensors.torch import load_file, save_file

require("transformers")
from test_checkpoint_fp8 import _reference_dequant  # noqa: E402
from test_v4 import CONFIGS, _perturb  # noqa: E402
from transformers import DeepseekV4ForCausalLM  # noqa: E402
from transformers.integrations.finegrained_fp8 import Fp8Dequantize  # noqa: E402

from daulat.checkpoint import load_model, save_model  # noqa: E402
from daulat.errors import DaulatError  # noqa: E402
from daulat.model_v4 import EXPERT_KEY, DeepseekV4, ModelConfigV4, from_hf_state_dict_v4  # noqa: E402
from daulat.quant import dequantize_mxfp4, quantize, quantize_mxfp4  # noqa: E402

# stored FP8 in V4's release: the attention's projections, the indexer's query, the shared experts
FP8_KEYS = re.compile(r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|shared_experts\.w[123])\.weight$")
FLOAT32 = ("hc_", "attn_sink", ".ape", "gate.bias")  # kept float32 on disk, as DeepSeek ships them
BLOCK = 16  # the tiny model's dimensions are multiples of 16: a real grid of blocks (the release: 128)


def _e2m1(nibble: int) -> float:
    """One e2m1 code from its bits: sign (bit 3), exponent (bits 2-1, bias 1), mantissa (bit 0)."""
    sign, exponent, mantissa = -1.0 if nibble & 8 else 1.0, (nibble >> 1) & 3, nibble & 1
    return sign * (mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1))


def _reference_mxfp4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W[i, j] = e2m1(nibble j of row i: the low one for even j) * 2**(e[i, j // 32] - 127), value by value."""
    codes, exps = packed.view(torch.uint8).tolist(), scales.view(torch.uint8).tolist()
    return torch.tensor([[_e2m1(row[j // 2] >> 4 * (j % 2) & 15) * 2.0 ** (exp[j // 32] - 127)
                          for j in range(2 * len(row))] for row, exp in zip(codes, exps)])


def _random_v4(name: str = "mix-hc2-hash", seed: int = 3) -> DeepseekV4:
    model = DeepseekV4(ModelConfigV4(**CONFIGS[name][0])).eval()
    _perturb(model, model.config.n_routed_experts, seed)
    return model


def _release(model: DeepseekV4, path, expert_dtype: str = "fp4", scale_fmt: str | None = "ue8m0",
             block: int = BLOCK) -> dict[str, torch.Tensor]:
    """Write `model` in V4's published quantized layout; returns the reference weights (under the
    published names) that the release stands for, dequantized value by value."""
    save_model(model, path)
    tensors, out, reference = load_file(path / "model.safetensors"), {}, {}
    for key, tensor in tensors.items():
        stem = key.removesuffix(".weight")
        if EXPERT_KEY.match(key) and expert_dtype == "fp4":
            out[key], out[stem + ".scale"] = quantize_mxfp4(tensor)
            reference[key] = _reference_mxfp4(out[key], out[stem + ".scale"])
        elif FP8_KEYS.search(key) or (EXPERT_KEY.match(key) and expert_dtype == "fp8"):
            q, s = quantize(tensor, (block, block), scale_fmt)
            out[key], out[stem + ".scale"] = q, s.to(torch.float8_e8m0fnu) if scale_fmt == "ue8m0" else s
            reference[key] = _reference_dequant(q, s, (block, block))
        else:
            out[key] = tensor if any(k in key for k in FLOAT32) or tensor.dtype == torch.long else tensor.bfloat16()
            reference[key] = out[key].float() if out[key].is_floating_point() else out[key]
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    quantization = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [block, block], **({"scale_fmt": scale_fmt} if scale_fmt else {})}
    config.update(quantization_config=quantization, expert_dtype=expert_dtype, dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(config))
    return reference


def _reference_model(model: DeepseekV4, reference: dict[str, torch.Tensor]) -> DeepseekV4:
    out = DeepseekV4(model.config).eval()
    out.load_state_dict(from_hf_state_dict_v4(reference), strict=not model.config.tie_word_embeddings)
    return out


def _ids(model, seed: int = 4) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(5, 64), (3, 70), (2, 33, 128)])
def test_mxfp4_math_matches_the_bit_level_reference_and_transformers(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])  # groups of very different size
    packed, scales = quantize_mxfp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert scales.dtype == torch.float8_e8m0fnu and scales.shape == (*shape[:-1], -(-shape[-1] // 32))
    got = dequantize_mxfp4(packed, scales, slab_bytes=1)  # one row a slab: the seams are covered
    flat_p, flat_s = packed.reshape(-1, *packed.shape[-2:]), scales.reshape(-1, *scales.shape[-2:])
    want = torch.stack([_reference_mxfp4(p, s)[:, : shape[-1]] for p, s in zip(flat_p, flat_s)]).reshape(shape)
    assert torch.equal(got, want)
    amax = w.reshape(*shape[:-1], -1).abs().amax(-1, keepdim=True)
    assert ((got - w).abs() <= amax / 3 + 1e-30).all()  # e2m1: the coarsest step is 2 of 6, halved
    if shape[-1] % 32 == 0:  # transformers' own FP4 dequantization (it takes whole groups only)
        theirs = Fp8Dequantize(None)._dequantize_one(packed, scales, output_dtype=torch.float32)
        assert torch.equal(theirs, got)


@pytest.mark.parametrize("expert_dtype, scale_fmt", [("fp4", "ue8m0"), ("fp8", None)])
def test_v4_release_loads_with_the_reference_dequantization_and_as_transformers_reads_it(tmp_path, expert_dtype,
                                                                                         scale_fmt):
    """V4-Flash (MXFP4 experts, ue8m0 scales stored as F8_E8M0) and Flash-Base-like (FP8 experts,
    float32 scales)."""
    model = _random_v4()
    reference = _reference_model(model, _release(model, tmp_path / "r", expert_dtype, scale_fmt))
    loaded = load_model(tmp_path / "r")
    assert type(loaded) is DeepseekV4 and loaded.config == model.config
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = _ids(model)
    hf, info = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "r", dtype=torch.float32,
                                                     attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info
    assert hf.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float32  # dequantized on a CPU
    with torch.no_grad():
        ours = loaded(ids)
        assert ours.abs().max() > 0.05
        assert (ours - reference(ids)).abs().max() <= 1e-4
        assert (hf.eval()(ids).logits - ours).abs().max() <= 1e-4
        assert (ours - model(ids)).abs().max() > 1e-3  # the quantization is really there
    bf16 = load_model(tmp_path / "r", dtype=torch.bfloat16)
    assert bf16.layers[1].mlp.gate_up_proj.dtype == torch.bfloat16
    assert torch.equal(bf16.layers[1].mlp.gate_up_proj, reference.layers[1].mlp.gate_up_proj.bfloat16())


W, E = "layers.1.attn.wq_a", "layers.1.ffn.experts.2.w1"


def _set(key, make):
    return lambda t: t.__setitem__(key, make(t))


DAMAGE = {
    "weight-without-scale": (lambda t: t.pop(W + ".scale"), f"'{W}.weight' is float8 without its '{W}.scale'"),
    "expert-without-scale": (lambda t: t.pop(E + ".scale"), f"'{E}.weight' is packed FP4 .I8. without its '{E}.scale'"),
    "scale-without-weight": (lambda t: t.pop(W + ".weight"), f"scale '{W}.scale' has no weight '{W}.weight'"),
    # an expert's weight is counted first (as for V3): the expert is missing, named so
    "expert-scale-without-weight": (lambda t: t.pop(E + ".weight"), f"missing tensor '{E}.weight'"),
    "stray-expert-scale": (_set("layers.1.ffn.experts.8.w1.scale", lambda t: t[E + ".scale"].clone()),
                           "scale 'layers.1.ffn.experts.8.w1.scale' has no weight 'layers.1.ffn.experts.8.w1.weight'"),
    "grid": (_set(W + ".scale", lambda t: t[W + ".scale"][:1].clone()),
             rf"'{W}.scale' has shape \(1, 4\); weight \(32, 64\) in blocks of 16x16 needs \(2, 4\)"),
    "expert-grid": (_set(E + ".scale", lambda t: t[E + ".scale"][:, :1].clone()),
                    rf"'{E}.scale' has shape \(32, 1\); weight \(32, 32\) in two FP4 values a byte, one scale "
                    rf"per 32 values needs \(32, 2\)"),
    "packed-shape": (lambda t: (t.__setitem__(E + ".weight", t[E + ".weight"][:, :30].clone()),
                                t.__setitem__(E + ".scale", t[E + ".scale"][:, :2].clone())),
                     rf"'{E}.weight' has shape \(32, 30\), config.json implies \(32, 32\) \(packed two FP4"),
    "scale-dtype": (_set(W + ".scale", lambda t: t[W + ".scale"].float().bfloat16()),
                    f"'{W}.scale' has dtype BF16: expected F32 or F8_E8M0"),
    "scale-of-a-bf16-weight": (_set("layers.1.attn.compressor.wkv.scale", lambda t: torch.ones(4, 4)),
                               "belongs to 'layers.1.attn.compressor.wkv.weight', which is BF16, not float8"),
    "nan-scale": (_set(E + ".scale", lambda t: torch.full(t[E + ".scale"].shape, 255, dtype=torch.uint8)
                       .view(torch.float8_e8m0fnu)), f"tensor '{E}.weight' holds NaN or Inf"),
}
CONFIG_DAMAGE = {
    "block": ({"weight_block_size": [32, 32]}, r"scale 'layers\.\d\.\S+\.scale' has shape .* blocks of 32x32"),
    "method": ({"quant_method": "mxfp4"}, "quant_method 'mxfp4' is not supported"),
    "fmt": ({"fmt": "e5m2"}, "fmt 'e5m2' is not supported"),
    "expert-dtype": ({"expert_dtype": "nvfp4"}, "expert_dtype 'nvfp4' is not supported"),
    "experts-said-fp8": ({"expert_dtype": "fp8"}, "is packed FP4 .I8., but config.json's expert_dtype is 'fp8'"),
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "r"
    _release(_random_v4(seed=5), path)
    return path


@pytest.mark.parametrize("damage", list(DAMAGE) + list(CONFIG_DAMAGE))
def test_a_damaged_v4_release_is_one_line_naming_the_tensor(tmp_path, release, damage):
    path = tmp_path / "r"
    path.mkdir()
    tensors, config = load_file(release / "model.safetensors"), json.loads((release / "config.json").read_text())
    if damage in DAMAGE:
        edit, words = DAMAGE[damage]
        edit(tensors)
    else:
        keys, words = CONFIG_DAMAGE[damage]
        config["quantization_config"].update(keys)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DaulatError, match=words) as e:
        load_model(path)
    assert "\n" not in str(e.value)
