"""`daulat export`: ship a checkpoint to llama.cpp (GGUF) or as a clean transformers directory.

    daulat export runs/chat --format gguf --dtype q8_0 --out chat-q8_0.gguf   # llama.cpp, ollama, LM Studio...
    daulat export runs/chat --format gguf --dtype q4_k_m --out chat-q4.gguf   # laptops: llama.cpp's k-quants
    daulat export runs/chat --format hf --out chat-hf                         # transformers, vLLM

GGUF is written with the `gguf` package as llama.cpp's `deepseek2` architecture (its name for
DeepSeek-V2/V3), with every key its loader reads, including those its own converter leaves out for
small custom models. What llama.cpp expects, and what this module does about it:

  * MLA in its absorbed form: kv_b_proj [H*(n+v), c] is split per head into attn_k_b [H, c, n]
    (transposed) and attn_v_b [H, v, c]; the cache holds c + r numbers per token, as in daulat.
  * RoPE on adjacent pairs (ggml's "normal" mode) = DeepSeek's interleaved pairs, so weights go as they
    are; a checkpoint with rope_interleave=false (NeoX halves) has its RoPE rows permuted into pairs.
  * YaRN: llama.cpp rebuilds the frequencies from factor / original context / beta 32,1 and scales
    attention by mscale_all_dim (rope.scaling.yarn_log_multiplier); YaRN's factor on cos/sin (which
    transformers takes from mscale / mscale_all_dim / attention_factor) is folded into the RoPE rows of
    the query and key projections, and llama.cpp's own is cancelled with rope.scaling.attn_factor.
  * DeepSeekMoE: experts stacked into 3-D tensors, sigmoid gating, the correction bias exp_probs_b,
    group-limited routing (expert_group_count / expert_group_used_count). llama.cpp always runs a shared
    expert, so a model without one gets a zero shared expert, which adds exactly 0.
  * The tokenizer: byte-level BPE ("gpt2") whose pre-tokenizer is llama.cpp's "smollm" (each digit
    alone, then GPT-2's regex: exactly daulat's), special tokens as CONTROL, add_bos_token=true (daulat
    starts every document with <|bos|>; llama.cpp drops the chat template's own leading <|bos|>), and
    the chat template.

DeepSeek-V3.2 goes out as llama.cpp's `deepseek32`: all of the above plus the lightning indexer per
layer (GGUF_ARCHITECTURES below): indexer.attn_q_b (RoPE rows scaled by YaRN's cos/sin factor squared,
which daulat applies to the indexer's query and key alike; its key is LayerNormed before RoPE, so all
of it goes on the query), indexer.attn_k, the LayerNorm indexer.k_norm (weight and bias) and the head
weights indexer.proj (float32 in every file type written here), with attention.indexer.head_count /
key_length / top_k. Both sides rotate the first qk_rope_head_dim dims of the indexer's query and key
in NeoX halves, so those rows go unpermuted.

f32, f16, bf16 and q8_0 are written here; the k-quants below 8 bits (q6_k, q5_k_m, q4_k_m) by llama.cpp's
own quantizer (llama-cpp-python) from a temporary f16 file, exactly what `llama-quantize` would make of it.
k-quant blocks span 256 numbers of a row: hidden_size must be a multiple of 256, and llama.cpp gives the
tensors whose rows are not (attn_k_b, whose rows are qk_nope_head_dim long) a fallback type (q5_0, q5_1, q8_0).

DeepSeek-V4 goes out as llama.cpp's `deepseek4`, a layout of its own (GGUF_ARCHITECTURES below): per layer
the shared-KV MQA (attn_q_a/q_a_norm/q_b, attn_kv + attn_kv_a_norm, attn_sinks, attn_output_a/b for the
grouped output LoRA), the hyper-connection mixers hc_{attn,ffn}_{fn,base,scale}, in a compressed layer
attn_compressor_{kv,gate,ape,norm} and, for CSA, indexer.attn_q_b, indexer.proj and
indexer_compressor_{kv,gate,ape,norm}; the MoE with exp_probs_b, or ffn_gate_tid2eid (int32) in the first
hash_layer_count layers; output_hc_{fn,base,scale} for the final collapse. Keys: compress_ratios per layer
(0, 4 or 128: the only rates llama.cpp takes), compress_rope_freq_base, output_group_count/lora_rank,
hyper_connection.count (4 only)/sinkhorn_iterations/epsilon, indexer head_count/key_length/top_k,
sqrtsoftplus gating, swiglu_clamp_exp/shexp. Both sides rotate adjacent pairs in place (ggml's normal
mode), apply YaRN to the compressed layers only with cos/sin factor 1, run the same Sinkhorn (column
first and last), so the weights go as they are; the mixers and the compressors' position biases stay
float32 in every file type (as daulat keeps them). MTP modules are left out, as for deepseek2.

Verified against llama.cpp 0c1e57098 (as bundled in llama-cpp-python 0.3.36) by tests/test_llama_cpp.py,
tests/test_llama_cpp_v32.py and tests/test_llama_cpp_v4.py.
A configuration llama.cpp cannot compute exactly is refused with one line naming the field.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from daulat.errors import DaulatError

# k-quants below 8 bits: written by llama.cpp's own quantizer (llama-cpp-python) from an f16 file, as
# llama.cpp's convert + llama-quantize do; "_m" mixes keep some tensors one step finer (llama.cpp's choice)
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
K_QUANT_BLOCK = 256  # ggml's QK_K: a k-quant block covers 256 numbers of one row
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", *K_QUANTS)
HF_DTYPES = ("f32", "f16", "bf16", "fp8")
GGUF_PRE_TOKENIZER = "smollm"  # llama.cpp's name for: split off each digit, then GPT-2's byte-level regex
# llama.cpp's deepseek2 loader takes these layer counts for DeepSeek-V2-Lite-like models and then never
# reads q_lora_rank (src/models/deepseek2.cpp, `is_lite`)
_LITE_LAYER_COUNTS = (26, 27)


# ------------------------------------------------------------------------------------------------
# What llama.cpp can represent
# ------------------------------------------------------------------------------------------------


def _refuse(field: str, value, why: str):
    raise DaulatError(f"cannot export to GGUF: config field {field!r} = {value!r}: {why}")


def gguf_architecture(config) -> "GGUFArchitecture":
    """The llama.cpp layout daulat writes for `config`'s model_type, or a DaulatError saying why none."""
    model_type = type(config).model_type  # kimi_k2 is read as deepseek_v3
    if model_type not in GGUF_ARCHITECTURES:
        _refuse("model_type", model_type, "daulat writes llama.cpp's deepseek2 (DeepSeek-V3), deepseek32 "
                "(DeepSeek-V3.2) and deepseek4 (DeepSeek-V4) layouts only; export with --format hf "
                "(transformers, vLLM)")
    return GGUF_ARCHITECTURES[model_type]


def check_llama_cpp(config) -> None:
    """Raise a DaulatError naming the first config field llama.cpp cannot compute exactly."""
    refuse = _refuse
    arch = gguf_architecture(config)
    if arch.check is not None:
        arch.check(config)
    if arch.tensors is not None:  # a layout of its own: its check is the whole check
        return
    if config.attention_bias:
        refuse("attention_bias", True, f"llama.cpp's {arch.name} has no attention biases")
    if config.hidden_act != "silu":
        refuse("hidden_act", config.hidden_act, f"llama.cpp's {arch.name} uses SiLU (SwiGLU) only")
    if config.qk_nope_head_dim < 1:
        refuse("qk_nope_head_dim", config.qk_nope_head_dim, "llama.cpp's MLA needs at least 1")
    if abs(config.rms_norm_eps - 1e-6) > 1e-12:
        refuse("rms_norm_eps", config.rms_norm_eps, "llama.cpp applies it to the q_a/kv_a latent norms too, "
               "which transformers and daulat fix at 1e-6; only 1e-6 exports exactly")
    if config.num_hidden_layers > 512:
        refuse("num_hidden_layers", config.num_hidden_layers, "llama.cpp takes at most 512 layers")
    layers = config.num_hidden_layers
    lite = layers in _LITE_LAYER_COUNTS or (layers == 48 and config.vocab_size == 128256)
    if config.q_lora_rank is not None and lite and arch.name == "deepseek2":
        refuse("q_lora_rank", config.q_lora_rank, f"llama.cpp takes a {config.num_hidden_layers}-layer deepseek2 "
               "for DeepSeek-V2-Lite and ignores the low-rank query; use another layer count or no q_lora_rank")
    if _has_moe(config) and config.n_routed_experts > 1024:
        refuse("n_routed_experts", config.n_routed_experts, "llama.cpp takes at most 1024 experts")
    ys = config.rope_scaling
    if ys is not None:
        if ys.get("truncate", True) is False:
            refuse("rope_scaling.truncate", False, "llama.cpp always rounds YaRN's correction range (truncate=true)")
        # llama.cpp's deepseek2/deepseek32 do not read yarn_beta_fast/slow from GGUF: they always use 32 and 1
        for key, default in (("beta_fast", 32), ("beta_slow", 1)):
            value = ys.get(key)
            if value is not None and float(value) != default:
                refuse(f"rope_scaling.{key}", value, f"llama.cpp's {arch.name} always uses {default}")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise DaulatError("GGUF export needs the gguf package: pip install 'daulat[export]'") from None
    return gguf


def _has_moe(config) -> bool:
    return config.first_k_dense_replace < config.num_hidden_layers


# ------------------------------------------------------------------------------------------------
# Tensors: daulat's modules -> llama.cpp's names and layouts (numpy arrays, float32)
# ------------------------------------------------------------------------------------------------


def _rope_rows(weight, n_groups: int, skip: int, rope: int, factor: float, interleave: bool):
    """weight [n_groups*(skip+rope), in]: in each group, the last `rope` rows feed RoPE. Scale them by
    YaRN's cos/sin factor (RoPE is linear, so this equals scaling cos and sin) and, for NeoX-style
    halves (i, i+r/2), reorder them into the adjacent pairs (2i, 2i+1) that llama.cpp rotates."""
    import torch

    w = weight.detach().float().reshape(n_groups, skip + rope, -1).clone()
    pe = w[:, skip:] * factor
    if not interleave:
        half = rope // 2
        order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
        pe = pe[:, order]
    w[:, skip:] = pe
    return w.reshape(weight.shape)


def gguf_tensors(model):
    """Yield (gguf name, float32 numpy array in PyTorch [out, in] order) for every tensor llama.cpp loads."""
    import torch

    config = model.config
    H, n, r, v, c = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                     config.v_head_dim, config.kv_lora_rank)
    cos_factor, interleave = float(model.rope_attention_factor), config.rope_interleave
    arch = gguf_architecture(config)

    def arr(t):
        return t.detach().float().contiguous().numpy()

    yield "token_embd.weight", arr(model.embed_tokens.weight)
    for i, layer in enumerate(model.layers):
        blk = f"blk.{i}."
        attn = layer.self_attn
        yield blk + "attn_norm.weight", arr(layer.input_layernorm.weight)
        if hasattr(attn, "q_proj"):
            yield blk + "attn_q.weight", arr(_rope_rows(attn.q_proj.weight, H, n, r, cos_factor, interleave))
        else:
            yield blk + "attn_q_a.weight", arr(attn.q_a_proj.weight)
            yield blk + "attn_q_a_norm.weight", arr(attn.q_a_layernorm.weight)
            yield blk + "attn_q_b.weight", arr(_rope_rows(attn.q_b_proj.weight, H, n, r, cos_factor, interleave))
        yield blk + "attn_kv_a_mqa.weight", arr(_rope_rows(attn.kv_a_proj_with_mqa.weight, 1, c, r, cos_factor,
                                                           interleave))
        yield blk + "attn_kv_a_norm.weight", arr(attn.kv_a_layernorm.weight)
        kv_b = attn.kv_b_proj.weight.detach().float().reshape(H, n + v, c)
        k_b, v_b = kv_b.split([n, v], dim=1)
        yield blk + "attn_k_b.weight", arr(k_b.transpose(1, 2))  # [H, c, n]: ggml {n, c, H}
        yield blk + "attn_v_b.weight", arr(v_b)  # [H, v, c]: ggml {c, v, H}
        yield blk + "attn_output.weight", arr(attn.o_proj.weight)
        if arch.layer_tensors is not None:
            yield from ((name, arr(t)) for name, t in arch.layer_tensors(model, attn, blk))
        yield blk + "ffn_norm.weight", arr(layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        if not config.is_moe_layer(i):
            yield blk + "ffn_gate.weight", arr(mlp.gate_proj.weight)
            yield blk + "ffn_up.weight", arr(mlp.up_proj.weight)
            yield blk + "ffn_down.weight", arr(mlp.down_proj.weight)
            continue
        yield blk + "ffn_gate_inp.weight", arr(mlp.gate.weight)
        yield blk + "exp_probs_b.bias", arr(mlp.gate.e_score_correction_bias)
        gate, up = mlp.gate_up_proj.detach().chunk(2, dim=1)  # [E, I, D] each
        yield blk + "ffn_gate_exps.weight", arr(gate)
        yield blk + "ffn_up_exps.weight", arr(up)
        yield blk + "ffn_down_exps.weight", arr(mlp.down_proj)  # [E, D, I]
        if mlp.shared_experts is not None:
            shared = mlp.shared_experts
            yield blk + "ffn_gate_shexp.weight", arr(shared.gate_proj.weight)
            yield blk + "ffn_up_shexp.weight", arr(shared.up_proj.weight)
            yield blk + "ffn_down_shexp.weight", arr(shared.down_proj.weight)
        else:  # llama.cpp always adds a shared expert: a zero one adds exactly 0
            I, D = config.moe_intermediate_size, config.hidden_size
            yield blk + "ffn_gate_shexp.weight", torch.zeros(I, D).numpy()
            yield blk + "ffn_up_shexp.weight", torch.zeros(I, D).numpy()
            yield blk + "ffn_down_shexp.weight", torch.zeros(D, I).numpy()
    yield "output_norm.weight", arr(model.norm.weight)
    if not config.tie_word_embeddings:  # llama.cpp reuses token_embd when output is absent
        yield "output.weight", arr(model.lm_head.weight)


def _tensor_type(name: str, array, dtype: str):
    """llama.cpp keeps norms, biases, 1-D tensors and the router in float32 whatever the file type."""
    Q = _gguf().GGMLQuantizationType

    if array.dtype.kind == "i":
        return Q.I32
    if _DEEPSEEK4_F32.search(name):
        return Q.F32
    if array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or ".ffn_gate_inp." in name \
            or ".indexer.proj." in name:  # the indexer's head weights: float32 in DeepSeek-V3.2 too
        return Q.F32
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]


# ------------------------------------------------------------------------------------------------
# Metadata
# ------------------------------------------------------------------------------------------------


def _yarn_keys(config) -> dict:
    """rope.scaling.* values that make llama.cpp's YaRN equal transformers' (see the module docstring)."""
    import math

    ys = config.rope_scaling
    factor = float(ys["factor"])
    keys = {"type": "yarn", "factor": factor, "original_context_length": int(ys["original_max_position_embeddings"])}
    mscale_all_dim = ys.get("mscale_all_dim")
    if mscale_all_dim and factor > 1:
        # llama.cpp: softmax scale *= (0.1*m*ln(factor) + 1)^2 with m = this key / 0.1; cos/sin factor 1
        keys["yarn_log_multiplier"] = 0.1 * float(mscale_all_dim)
    elif factor > 1:
        # without the key llama.cpp multiplies cos/sin AND the softmax scale by 0.1*ln(factor) + 1:
        # attn_factor cancels both (transformers' cos/sin factor is folded into the weights)
        keys["attn_factor"] = 1.0 / (0.1 * math.log(factor) + 1.0)
    return keys


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """The tokenizer as llama.cpp reads it: tokens (padded to the model's vocab), token types, merges,
    special ids. A tokenizer llama.cpp would split differently is a DaulatError naming the field."""
    gguf = _gguf()

    spec = json.loads(tokenizer.tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise DaulatError(f"cannot export to GGUF: tokenizer model {model.get('type')!r}: "
                          "only byte-level BPE is supported")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "ignore_merges"):
        if model.get(key):  # None, "", 0 and False are the plain BPE that llama.cpp runs
            raise DaulatError(f"cannot export to GGUF: tokenizer model.{key} = {model.get(key)!r}: "
                              "llama.cpp's BPE has no such option")
    if spec.get("normalizer") is not None:
        raise DaulatError(f"cannot export to GGUF: tokenizer normalizer {spec['normalizer'].get('type')!r}: "
                          "llama.cpp's byte-level BPE does not normalize")
    if _pre_tokenizer_signature(spec.get("pre_tokenizer")) != ["digits", "bytelevel"]:
        raise DaulatError("cannot export to GGUF: tokenizer pre_tokenizer differs from daulat's (each digit "
                          "alone, then byte-level GPT-2 regex without prefix space): llama.cpp would split text "
                          "differently")

    id_to_token = {i: t for t, i in model.get("vocab", {}).items()}
    special, user_defined = set(), set()
    for added in spec.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
        (special if added.get("special") else user_defined).add(added["id"])
    if max(id_to_token) >= vocab_size:
        raise DaulatError(f"cannot export to GGUF: the tokenizer has id {max(id_to_token)} but the model's "
                          f"vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:  # embedding rows no token uses (vocab padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(id_to_token[i])
            types.append(gguf.TokenType.CONTROL if i in special else
                         gguf.TokenType.USER_DEFINED if i in user_defined else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges,
            "bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}


def _pre_tokenizer_signature(pre) -> list[str]:
    """Reduce a tokenizers pre_tokenizer spec to the steps llama.cpp can mirror ('?' for anything else)."""
    if pre is None:
        return []
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    out = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split" and step.get("pattern") == {"Regex": r"\p{N}"} and step.get("behavior") == "Isolated" \
                and not step.get("invert"):
            out.append("digits")
        elif kind == "ByteLevel" and not step.get("add_prefix_space") and step.get("use_regex", True):
            out.append("bytelevel")
        else:
            out.append("?")
    return out


def _chat_template(checkpoint: Path) -> str | None:
    """The chat template saved with the tokenizer (tokenizer_config.json or chat_template.jinja)."""
    file = checkpoint / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    config = checkpoint / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return None


# ------------------------------------------------------------------------------------------------
# Architectures: deepseek2 (DeepSeek-V3) and what deepseek32 (DeepSeek-V3.2) adds to it
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFArchitecture:
    """One llama.cpp architecture daulat writes: deepseek2's layout plus its own checks, keys and tensors."""

    name: str  # general.architecture
    check: Callable | None = None  # config -> None, raising a DaulatError (before deepseek2's checks)
    keys: Callable | None = None  # (writer, gguf, config) -> None: keys beyond deepseek2's
    layer_tensors: Callable | None = None  # (model, attention, "blk.{i}.") -> (name, torch tensor) pairs
    # an architecture with a layout of its own (deepseek4): every tensor and model key, and `check` alone
    tensors: Callable | None = None  # model -> (name, numpy array) pairs, replacing deepseek2's gguf_tensors
    model_keys: Callable | None = None  # (writer, gguf, config) -> None, replacing deepseek2's model/MoE keys


def _check_deepseek32(config) -> None:
    """What llama.cpp's deepseek32 cannot run: it rotates the indexer's queries and keys by a Hadamard
    matrix (which leaves their products unchanged), and aborts building its graph (GGML_ASSERT in
    ggml_mul_mat) unless index_head_dim is a power of two of at least 64 (measured with 16 to 512)."""
    d = config.index_head_dim
    if d < 64 or d & (d - 1):
        _refuse("index_head_dim", d, "llama.cpp's deepseek32 runs the indexer's Hadamard rotation only for a power "
                "of two of at least 64 (DeepSeek-V3.2's is 128)")


def _deepseek32_keys(writer, gguf, config) -> None:
    """The lightning indexer's keys ({arch}.attention.indexer.*); its LayerNorm's epsilon is llama.cpp's
    fixed 1e-6, as daulat's and transformers'. Also YaRN's rotation magnitude: with mscale_all_dim = M
    (not 1), llama.cpp takes mscale = M for deepseek2 but 1 for every other architecture, so deepseek32
    rotates by yarn_mscale(1) / yarn_mscale(M); rope.scaling.attn_factor cancels it to the 1 of deepseek2
    (transformers' own cos/sin factor is in the weights, see the module docstring)."""
    from daulat.model import yarn_mscale

    arch = "deepseek32"
    writer.add_uint32(f"{arch}.attention.indexer.head_count", config.index_n_heads)
    writer.add_uint32(f"{arch}.attention.indexer.key_length", config.index_head_dim)
    writer.add_uint32(f"{arch}.attention.indexer.top_k", config.index_topk)
    if not _has_moe(config):  # deepseek32 reads the gating function even without MoE layers
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if "yarn_log_multiplier" in (_yarn_keys(config) if config.rope_scaling is not None else {}):
        factor, all_dim = float(config.rope_scaling["factor"]), float(config.rope_scaling["mscale_all_dim"])
        if all_dim != 1.0:
            writer.add_rope_scaling_attn_factors(yarn_mscale(factor, all_dim) / yarn_mscale(factor, 1.0))


def _indexer_rope_factor(model) -> float:
    """The factor on the indexer's rotated query rows that makes llama.cpp's scores daulat's: daulat's RoPE
    scales cos/sin by YaRN's attention factor m on both query and key (m^2 on their product), llama.cpp
    rotates the indexer by 1 (see _deepseek32_keys); the key is LayerNormed before RoPE, so all of m^2
    goes on the query."""
    return float(model.rope_attention_factor) ** 2


def _deepseek32_layer_tensors(model, attn, blk: str):
    """The lightning indexer of one layer. Its query and key carry RoPE on their first r dims in halves
    (ggml's NeoX mode, which llama.cpp's deepseek32 uses there): weights go unpermuted."""
    indexer = attn.indexer
    h, d, r = indexer.n_heads, indexer.head_dim, indexer.rope_dim
    wq_b = indexer.wq_b.weight.detach().float().reshape(h, d, -1).clone()
    wq_b[:, :r] *= _indexer_rope_factor(model)
    yield blk + "indexer.attn_q_b.weight", wq_b.reshape(h * d, -1)  # from the q_a-normed low-rank query
    yield blk + "indexer.attn_k.weight", indexer.wk.weight
    yield blk + "indexer.k_norm.weight", indexer.k_norm.weight  # LayerNorm, eps 1e-6
    yield blk + "indexer.k_norm.bias", indexer.k_norm.bias
    yield blk + "indexer.proj.weight", indexer.weights_proj.weight  # float32 in every file type


# DeepSeek-V4 as llama.cpp's deepseek4 (its own layout: nothing of deepseek2's MLA)

# kept float32 in every file type, as daulat and transformers keep them: the hyper-connection mixers and
# the compressors' position biases (1-D tensors, norms and the routers are float32 anyway)
_DEEPSEEK4_F32 = re.compile(r"(^output_hc_|\.hc_(attn|ffn)_|_ape\.)")
_DEEPSEEK4_RATES = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


def _check_deepseek4(config) -> None:
    """What llama.cpp's deepseek4 cannot run: it fixes the stream count, the two compression rates, the
    scoring function, and hash-routes only the first layers."""
    if config.hc_mult != 4:
        _refuse("hc_mult", config.hc_mult, "llama.cpp's deepseek4 runs 4 hyper-connection streams only "
                "(DeepSeek-V4's)")
    for kind in sorted(set(config.layer_types) - {"sliding_attention"}):
        if config.compress_rates.get(kind) != _DEEPSEEK4_RATES[kind]:
            _refuse(f"compress_rates.{kind}", config.compress_rates.get(kind), "llama.cpp's deepseek4 takes "
                    f"{_DEEPSEEK4_RATES[kind]} only (DeepSeek-V4's CSA 4, HCA 128)")
    d = config.index_head_dim
    if "compressed_sparse_attention" in config.layer_types and (d < 64 or d & (d - 1)):
        _refuse("index_head_dim", d, "llama.cpp's deepseek4 runs the indexer's Hadamard rotation only for a power "
                "of two of at least 64 (DeepSeek-V4's is 128; measured with 16 to 256)")
    if config.scoring_func != "sqrtsoftplus":
        _refuse("scoring_func", config.scoring_func, "llama.cpp's deepseek4 routes by sqrtsoftplus only")
    n_hash = _deepseek4_hash_layers(config)
    if "hash_moe" in config.mlp_layer_types[n_hash:]:
        _refuse("mlp_layer_types", config.mlp_layer_types, "llama.cpp's deepseek4 hash-routes the first "
                "layers only (hash_layer_count): every hash_moe must come before the first moe")
    if config.num_hidden_layers > 512:
        _refuse("num_hidden_layers", config.num_hidden_layers, "llama.cpp takes at most 512 layers")
    if config.n_routed_experts > 512:
        _refuse("n_routed_experts", config.n_routed_experts, "llama.cpp takes at most 512 experts")
    ys = config.rope_scaling
    if ys is not None:
        if float(ys.get("attention_factor", 1.0)) != 1.0:
            _refuse("rope_scaling.attention_factor", ys["attention_factor"], "llama.cpp's deepseek4 rotates "
                    "by YaRN without a cos/sin factor (DeepSeek-V4's 1)")
        if ys.get("truncate", True) is False:
            _refuse("rope_scaling.truncate", False, "llama.cpp always rounds YaRN's correction range (truncate=true)")
        for key, default in (("beta_fast", 32), ("beta_slow", 1)):
            if ys.get(key) is not None and float(ys[key]) != default:
                _refuse(f"rope_scaling.{key}", ys[key], f"llama.cpp's deepseek4 matches daulat only with {default} "
                        "(measured)")


def _deepseek4_hash_layers(config) -> int:
    """How many leading layers are hash-routed (llama.cpp's hash_layer_count)."""
    n = 0
    while n < len(config.mlp_layer_types) and config.mlp_layer_types[n] == "hash_moe":
        n += 1
    return n


def _gguf_shape_keys(writer, config, feed_forward: int) -> None:
    """The shape keys every DeepSeek GGUF has; one key/value head (MLA's latent, V4's shared head)."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(feed_forward)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(1)


def _deepseek4_keys(writer, gguf, config) -> None:
    """Shapes, attention, compression, hyper-connection, RoPE and MoE keys of a deepseek4 GGUF."""
    a, d = "deepseek4", config.head_dim
    _gguf_shape_keys(writer, config, config.moe_intermediate_size)  # one key (= value) head shared by all
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_q_lora_rank(config.q_lora_rank)
    writer.add_sliding_window(config.sliding_window)
    writer.add_uint32(f"{a}.attention.output_group_count", config.o_groups)
    writer.add_uint32(f"{a}.attention.output_lora_rank", config.o_lora_rank)
    writer.add_array(f"{a}.attention.compress_ratios", [_DEEPSEEK4_RATES[t] for t in config.layer_types])
    writer.add_uint32(f"{a}.attention.indexer.head_count", config.index_n_heads)
    writer.add_uint32(f"{a}.attention.indexer.key_length", config.index_head_dim)
    writer.add_uint32(f"{a}.attention.indexer.top_k", config.index_topk)
    writer.add_uint32(f"{a}.hyper_connection.count", config.hc_mult)
    writer.add_uint32(f"{a}.hyper_connection.sinkhorn_iterations", config.hc_sinkhorn_iters)
    writer.add_float32(f"{a}.hyper_connection.epsilon", config.hc_eps)
    _deepseek4_rope_keys(writer, gguf, config)
    writer.add_leading_dense_block_count(0)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_shared_count(1)  # daulat's (and transformers') V4 has one shared expert whatever the count
    writer.add_expert_weights_scale(config.routed_scaling_factor)
    writer.add_expert_weights_norm(True)  # daulat's V4 router always normalises (norm_topk_prob unread)
    writer.add_uint32(f"{a}.expert_gating_func", _DEEPSEEK4_SQRTSOFTPLUS)
    writer.add_uint32(f"{a}.hash_layer_count", _deepseek4_hash_layers(config))
    writer.add_float32(f"{a}.swiglu_clamp_exp", config.swiglu_limit)
    writer.add_float32(f"{a}.swiglu_clamp_shexp", config.swiglu_limit)


_DEEPSEEK4_SQRTSOFTPLUS = 4  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SQRT_SOFTPLUS


def _deepseek4_rope_keys(writer, gguf, config) -> None:
    """Sliding layers rotate at rope_theta unscaled; compressed layers (their queries, keys, entries and
    indexer) at compress_rope_theta with YaRN, whose cos/sin factor llama.cpp's deepseek4 cancels to 1."""
    writer.add_rope_dimension_count(config.qk_rope_head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_float32("deepseek4.attention.compress_rope_freq_base", config.compress_rope_theta)
    ys = config.rope_scaling
    if ys is None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        return
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(ys["factor"]))
    writer.add_rope_scaling_orig_ctx_len(int(ys["original_max_position_embeddings"]))


def _deepseek4_tensors(model):
    """Yield (gguf name, numpy array in PyTorch [out, in] order) for every tensor llama.cpp's deepseek4
    loads. RoPE on adjacent pairs kept in place is ggml's normal mode, as daulat's: weights go as they are."""
    import torch

    def arr(t):
        return t.detach().float().contiguous().numpy()

    yield "token_embd.weight", arr(model.embed_tokens.weight)
    for i, layer in enumerate(model.layers):
        blk = f"blk.{i}."
        yield blk + "attn_norm.weight", arr(layer.input_layernorm.weight)
        yield from ((blk + name, arr(t)) for name, t in _deepseek4_attention(layer.self_attn))
        for part, hc in (("attn", layer.attn_hc), ("ffn", layer.ffn_hc)):
            yield blk + f"hc_{part}_fn.weight", arr(hc.fn)  # [(2+n)*n, n*D]: pre, post, comb rows
            yield blk + f"hc_{part}_base.weight", arr(hc.base)
            yield blk + f"hc_{part}_scale.weight", arr(hc.scale)
        yield blk + "ffn_norm.weight", arr(layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        yield blk + "ffn_gate_inp.weight", arr(mlp.gate.weight)
        if mlp.is_hash:
            yield blk + "ffn_gate_tid2eid.weight", mlp.gate.tid2eid.detach().to(torch.int32).numpy()
        else:
            yield blk + "exp_probs_b.bias", arr(mlp.gate.e_score_correction_bias)
        gate, up = mlp.gate_up_proj.detach().chunk(2, dim=1)  # [E, I, D] each
        yield blk + "ffn_gate_exps.weight", arr(gate)
        yield blk + "ffn_up_exps.weight", arr(up)
        yield blk + "ffn_down_exps.weight", arr(mlp.down_proj)  # [E, D, I]
        shared = mlp.shared_experts
        yield blk + "ffn_gate_shexp.weight", arr(shared.gate_proj.weight)
        yield blk + "ffn_up_shexp.weight", arr(shared.up_proj.weight)
        yield blk + "ffn_down_shexp.weight", arr(shared.down_proj.weight)
    yield "output_hc_fn.weight", arr(model.hc_head.hc_fn)
    yield "output_hc_base.weight", arr(model.hc_head.hc_base)
    yield "output_hc_scale.weight", arr(model.hc_head.hc_scale)
    yield "output_norm.weight", arr(model.norm.weight)
    yield "output.weight", arr(model.lm_head.weight)  # deepseek4 always loads it (tied: the embedding again)


def _deepseek4_attention(attn):
    """One layer's attention tensors (names after "blk.{i}."): the shared-KV MQA, sinks, grouped output
    LoRA, and the compressor (plus the indexer and its compressor in a CSA layer)."""
    yield "attn_sinks.weight", attn.sinks
    yield "attn_q_a.weight", attn.q_a_proj.weight
    yield "attn_q_a_norm.weight", attn.q_a_norm.weight
    yield "attn_q_b.weight", attn.q_b_proj.weight
    yield "attn_kv.weight", attn.kv_proj.weight
    yield "attn_kv_a_norm.weight", attn.kv_norm.weight
    yield "attn_output_a.weight", attn.o_a_proj.weight  # [g*o_lora_rank, H*d/g]: group-major rows
    yield "attn_output_b.weight", attn.o_b_proj.weight
    compressors = [] if attn.compressor is None else [("attn_compressor", attn.compressor)]
    indexer = getattr(attn.compressor, "indexer", None)
    if indexer is not None:
        yield "indexer.attn_q_b.weight", indexer.q_b_proj.weight
        yield "indexer.proj.weight", indexer.weights_proj.weight
        compressors.append(("indexer_compressor", indexer))
    for prefix, c in compressors:  # CSA's project 2*dim channels: [previous window's half | own half]
        yield f"{prefix}_kv.weight", c.kv_proj.weight
        yield f"{prefix}_gate.weight", c.gate_proj.weight
        yield f"{prefix}_ape.weight", c.position_bias  # [rate, width]
        yield f"{prefix}_norm.weight", c.kv_norm.weight


GGUF_ARCHITECTURES = {
    "deepseek_v3": GGUFArchitecture("deepseek2"),
    "deepseek_v32": GGUFArchitecture("deepseek32", _check_deepseek32, _deepseek32_keys, _deepseek32_layer_tensors),
    "deepseek_v4": GGUFArchitecture("deepseek4", _check_deepseek4, tensors=_deepseek4_tensors,
                                    model_keys=_deepseek4_keys),
}


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------


def write_gguf(model, tokenizer, path, dtype: str = "f32", name: str = "daulat",
               chat_template: str | None = None) -> dict:
    """Write `model` + `tokenizer` as a llama.cpp deepseek2 GGUF file at `path`, atomically.
    Returns {"tensors": count, "bytes": file size, "types": {gguf type name: count}}."""
    gguf = _gguf()

    config = model.config
    check_llama_cpp(config)
    if dtype not in GGUF_DTYPES:
        raise DaulatError(f"unknown GGUF dtype {dtype!r} (choose from {', '.join(GGUF_DTYPES)})")
    vocab = tokenizer_metadata(tokenizer, config.vocab_size)
    path = Path(path)
    if path.is_dir():
        raise DaulatError(f"--out {path} is a directory: give a file name such as model.gguf")
    if dtype in K_QUANTS:
        return _write_k_quant(model, tokenizer, path, dtype, name, chat_template)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    arch = gguf_architecture(config)
    writer = gguf.GGUFWriter(tmp, arch.name)
    try:
        if arch.model_keys is not None:
            _gguf_general_keys(writer, gguf, dtype, name)
            arch.model_keys(writer, gguf, config)
        else:
            _gguf_model_keys(writer, gguf, config, dtype, name)
            _gguf_moe_keys(writer, gguf, config)
        if arch.keys is not None:
            arch.keys(writer, gguf, config)
        _gguf_tokenizer_keys(writer, vocab, chat_template)
        count, types = _gguf_add_tensors(writer, gguf, model, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"tensors": count, "bytes": path.stat().st_size, "types": types}


def _temporary(path: Path) -> Path:
    """A hidden file beside `path`, on the same file system, so that os.replace is atomic."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise DaulatError("GGUF k-quants (" + ", ".join(K_QUANTS) + ") are made by llama.cpp's quantizer: "
                          "pip install 'daulat[quantize]' (llama-cpp-python)") from None
    return llama_cpp


@contextlib.contextmanager
def llama_cpp_plain_buffers():
    """For the duration, llama-cpp-python loads models without llama.cpp's extra CPU buffer types
    (weights repacked for AMX and the like), as the GGUF checks (tests/test_llama_cpp*.py,
    bench/gguf_quality.py) load daulat's exports: on a CPU with AMX (a Xeon of 2023 on), llama.cpp
    0.3.36 aborts loading their f16, bf16 and q8_0 files with `GGML_ASSERT(*cur_backend_id != -1)` in
    its scheduler. llama-cpp-python does not expose `use_extra_bufts`, so its default model
    parameters are changed until the block ends."""
    bindings = _llama_cpp().llama_cpp
    defaults = bindings.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    bindings.llama_model_default_params = params
    try:
        yield
    finally:
        bindings.llama_model_default_params = defaults


def check_k_quant(config, dtype: str) -> None:
    """Refuse a k-quant that would not apply: ggml quantizes a row in blocks of 256, and llama.cpp gives
    every tensor whose rows are not a multiple of 256 another type (q4_k -> q5_0, q5_k -> q5_1,
    q6_k -> q8_0; f16 if not even a multiple of 32). Rows of most weights (embeddings, q/kv_a, gate/up,
    experts, router) are hidden_size long, so hidden_size decides whether the file is a k-quant at all;
    the others (attn_k_b: qk_nope_head_dim, attn_v_b/kv_b: kv_lora_rank, ...) fall back one by one."""
    if type(config).model_type == "deepseek_v4":
        raise DaulatError(f"cannot export GGUF {dtype}: config field 'model_type' = 'deepseek_v4': llama.cpp's "
                          "quantizer would also round deepseek4's hyper-connection mixers and compressor position "
                          "biases (float32 in daulat's files), which is not verified; use q8_0, bf16 or f16")
    if config.hidden_size % K_QUANT_BLOCK:
        raise DaulatError(f"cannot export GGUF {dtype}: config field 'hidden_size' = {config.hidden_size} is not a "
                          f"multiple of {K_QUANT_BLOCK} (a k-quant block): llama.cpp would store almost every "
                          "tensor in another type; use q8_0 or f16")


def _write_k_quant(model, tokenizer, path: Path, dtype: str, name: str, chat_template: str | None) -> dict:
    """An f16 GGUF beside `path`, requantized by llama.cpp (llama_model_quantize) into a second temporary
    that is renamed to `path`; both temporaries are removed whatever happens."""
    check_k_quant(model.config, dtype)
    llama_cpp = _llama_cpp()
    path.parent.mkdir(parents=True, exist_ok=True)
    source, target = _temporary(path.with_name(path.name + ".f16")), _temporary(path)
    try:
        write_gguf(model, tokenizer, source, "f16", name=name, chat_template=chat_template)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, K_QUANTS[dtype])
        from llama_cpp import _logger  # llama.cpp reports each tensor at INFO level: keep only its errors

        level = _logger.logger.level
        _logger.logger.setLevel("ERROR")
        try:
            code = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(target), params)
        finally:
            _logger.logger.setLevel(level)
        if code != 0 or not target.is_file():
            raise DaulatError(f"llama.cpp's quantizer failed to write {dtype} (code {code}; its error is above)")
        with open(target, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(target, path)
    finally:
        source.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
    return gguf_stats(path)


def gguf_stats(path) -> dict:
    """{"tensors": count, "bytes": file size, "types": {gguf type name: count}} of a GGUF file."""
    reader = _gguf().GGUFReader(path)
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return {"tensors": len(reader.tensors), "bytes": Path(path).stat().st_size, "types": types}


def _gguf_model_keys(writer, gguf, config, dtype: str, name: str) -> None:
    """general.*, the shapes, MLA and RoPE keys of a deepseek2 GGUF."""
    _gguf_general_keys(writer, gguf, dtype, name)
    # -- shapes; MLA: llama.cpp runs it as MQA over the latent: one KV head of c + r (keys) and c (values)
    _gguf_shape_keys(writer, config, config.intermediate_size)
    writer.add_q_lora_rank(config.q_lora_rank or 0)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    writer.add_value_length(config.kv_lora_rank)
    writer.add_key_length_mla(config.qk_nope_head_dim + config.qk_rope_head_dim)
    writer.add_value_length_mla(config.v_head_dim)
    # -- RoPE
    writer.add_rope_dimension_count(config.qk_rope_head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if config.rope_scaling is None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    else:
        yarn = _yarn_keys(config)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(yarn["factor"])
        writer.add_rope_scaling_orig_ctx_len(yarn["original_context_length"])
        if "yarn_log_multiplier" in yarn:
            writer.add_rope_scaling_yarn_log_mul(yarn["yarn_log_multiplier"])
        if "attn_factor" in yarn:
            writer.add_rope_scaling_attn_factors(yarn["attn_factor"])


def _gguf_general_keys(writer, gguf, dtype: str, name: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _gguf_moe_keys(writer, gguf, config) -> None:
    """The DeepSeekMoE keys (expert counts, gating, group-limited routing)."""
    writer.add_leading_dense_block_count(min(config.first_k_dense_replace, config.num_hidden_layers))
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if _has_moe(config):
        writer.add_expert_count(config.n_routed_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_shared_count(max(config.n_shared_experts, 1))  # see gguf_tensors
        writer.add_expert_weights_scale(config.routed_scaling_factor)
        writer.add_expert_weights_norm(bool(config.norm_topk_prob))
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        # llama.cpp requires used < count when count > 1; topk_group == n_group limits nothing
        limited = config.topk_group < config.n_group
        writer.add_expert_group_count(config.n_group if limited else 1)
        writer.add_expert_group_used_count(config.topk_group if limited else 1)
    else:  # every layer dense
        writer.add_expert_count(0)
        writer.add_expert_used_count(0)
        writer.add_expert_shared_count(0)


def _gguf_tokenizer_keys(writer, vocab: dict, chat_template: str | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GGUF_PRE_TOKENIZER)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_pad_token_id(vocab["pad"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


def _gguf_add_tensors(writer, gguf, model, dtype: str) -> tuple[int, dict[str, int]]:
    """Every tensor in its GGUF type; returns (count, {type name: count})."""
    types: dict[str, int] = {}
    count = 0
    layout = gguf_architecture(model.config).tensors or gguf_tensors
    for tensor_name, array in layout(model):
        qtype = _tensor_type(tensor_name, array, dtype)
        if qtype == gguf.GGMLQuantizationType.I32:  # deepseek4's token -> experts table
            writer.add_tensor(tensor_name, array, raw_dtype=qtype)
            types[qtype.name] = types.get(qtype.name, 0) + 1
            count += 1
            continue
        try:
            data = gguf.quants.quantize(array, qtype)
        except gguf.QuantError:  # rows not a multiple of the block size: llama.cpp's converter uses f16
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(array, qtype)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
        count += 1
    return count, types


def export_hf(checkpoint, out, dtype: str | None = None) -> Path:
    """Write a clean transformers directory: weights, config, tokenizer, model card and daulat.json;
    no train_state/ and no MTP weights. dtype "fp8" writes DeepSeek's official FP8 layout (float8_e4m3fn
    linear weights with a float32 `weight_scale_inv` per 128x128 block, the rest in bf16), which
    transformers, vLLM and `daulat load_model` read; any checkpoint daulat reads, FP8 included, can be
    written dequantized (f32, f16, bf16)."""
    import torch

    from daulat.checkpoint import load_checkpoint, to_hf_state_dict
    from daulat.report import save_documented

    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() == checkpoint.resolve():
        raise DaulatError(f"--out {out} is the checkpoint itself: export to another directory")
    if dtype is not None and dtype not in HF_DTYPES:
        raise DaulatError(f"--format hf takes --dtype {'|'.join(HF_DTYPES)}, not {dtype!r} (q8_0 is a GGUF type)")
    model, tokenizer, info = load_checkpoint(checkpoint)
    dropped = []
    if len(model.mtp):
        dropped.append(f"{len(model.mtp)} MTP module(s)")
        model.mtp = torch.nn.ModuleList()
        model.config.num_nextn_predict_layers = 0
    if (checkpoint / "train_state").is_dir():
        dropped.append("train_state/")
    dtype = dtype or _stored_dtype(checkpoint)
    weights, extra_config = None, None
    if dtype == "fp8":  # quantized from the float32 weights, before the rest is cast to bf16
        weights, extra_config = fp8_weights(to_hf_state_dict(model)[0])
    model.to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[dtype])
    for moe in model.moe_layers():  # selection bias: tiny steps of gamma, kept in float32 as DeepSeek ships it
        moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias.float()
    info = dict(info)
    info["export"] = {"format": "hf", "dtype": dtype, "source": checkpoint.name, "dropped": dropped}
    card = checkpoint / "README.md"
    save_documented(model, out, tokenizer=tokenizer, info=info, weights=weights, extra_config=extra_config,
                    card=card.read_text(encoding="utf-8") if card.is_file() else None)
    return out


FP8_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj")  # as in DeepSeek-V3's release; router, norms, embeddings stay


def fp8_weights(tensors: dict, spec=None) -> tuple[dict, dict]:
    """(checkpoint tensors with the linear weights block-quantized to FP8, the config.json keys saying so).
    spec: a daulat.quant.BlockFP8 (default: 128x128 blocks, float32 scales, as DeepSeek-V3 ships)."""
    import torch

    from daulat.quant import SCALE_SUFFIX, BlockFP8, quantize

    spec = spec or BlockFP8()
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in FP8_LINEARS:
            out[name], out[name + SCALE_SUFFIX] = quantize(tensor, spec.block, spec.scale_fmt)
        else:
            out[name] = tensor.float() if name.endswith("e_score_correction_bias") else tensor.to(torch.bfloat16)
    return out, {"quantization_config": spec.to_hf_dict(), "dtype": "bfloat16"}


def vllm_fit(config) -> str:
    """Whether vLLM's MLA kernels take this checkpoint's shapes (kv_lora_rank + qk_rope_head_dim is the
    latent head size they are compiled for: 320, 512 or 576 on GPU, only 576 in the CPU build)."""
    if not hasattr(config, "kv_lora_rank"):
        return f"not checked for {config.model_type} (daulat knows only vLLM's MLA kernel sizes)"
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    if latent == 576:
        return f"fits vLLM's MLA kernels on GPU and CPU (kv_lora_rank + qk_rope_head_dim = {latent})"
    if latent in (320, 512):
        return (f"fits vLLM's MLA kernels on GPU only (kv_lora_rank + qk_rope_head_dim = {latent}; "
                "its CPU build takes only 576)")
    return (f"does not fit vLLM's MLA kernels (kv_lora_rank + qk_rope_head_dim = {latent}; vLLM takes 320, 512 "
            "or 576 on GPU, 576 on CPU): use transformers, llama.cpp (GGUF) or `daulat serve`")


def export_gguf(checkpoint, out, dtype: str | None = None) -> dict:
    from daulat.checkpoint import load_checkpoint, load_config

    checkpoint = Path(checkpoint)
    check_llama_cpp(load_config(checkpoint))  # before reading any weights
    if dtype == "fp8":
        raise DaulatError("--dtype fp8 is for --format hf; GGUF takes " + ", ".join(GGUF_DTYPES))
    if dtype in K_QUANTS:  # before reading any weights, as the checks above
        check_k_quant(load_config(checkpoint), dtype)
        _llama_cpp()
    if not (checkpoint / "tokenizer.json").is_file():
        raise DaulatError(f"checkpoint {checkpoint} has no tokenizer.json: a GGUF file carries its tokenizer")
    model, tokenizer, _ = load_checkpoint(checkpoint)
    return write_gguf(model, tokenizer, out, dtype or _stored_dtype(checkpoint, "bf16"), name=_model_name(checkpoint),
                      chat_template=_chat_template(checkpoint))


def _model_name(checkpoint: Path) -> str:
    """general.name: the checkpoint's directory, with its run's for a trainer's final/ or step-N/."""
    path = checkpoint.resolve()
    if path.name == "final" or path.name.startswith("step-"):
        return f"{path.parent.name}-{path.name}"
    return path.name


def _stored_dtype(checkpoint: Path, quantized: str = "fp8") -> str:
    """The checkpoint's own precision (config.json "dtype"): f32 for what daulat trains; `quantized` for an
    FP8 checkpoint (bf16 where the target format has no FP8)."""
    from daulat.checkpoint import read_json
    from daulat.lora import is_adapter_dir, resolve_base

    if is_adapter_dir(checkpoint):  # exported merged, in its base's precision
        checkpoint = resolve_base(checkpoint)
    config = read_json(checkpoint / "config.json", expect=dict)
    if config.get("quantization_config"):
        return quantized
    stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"float16": "f16", "bfloat16": "bf16"}.get(stored, "f32")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="checkpoint directory (daulat's or transformers'; GGUF takes deepseek_v3, "
                             "deepseek_v32 and deepseek_v4)")
    parser.add_argument("--format", required=True, choices=["gguf", "hf"],
                        help="gguf: one file for llama.cpp and the tools built on it; hf: a transformers directory")
    parser.add_argument("--dtype", choices=tuple(dict.fromkeys(GGUF_DTYPES + HF_DTYPES)),
                        help="weight precision (default: the checkpoint's own, f32 for daulat's); q8_0 and the "
                             "k-quants q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer, hidden_size a multiple of 256) "
                             "are GGUF only, "
                             "fp8 (DeepSeek's 128x128 block-scaled layout) hf only; norms, biases and the router "
                             "stay f32")
    parser.add_argument("--out", required=True, help="the .gguf file (gguf) or directory (hf) to write")


def run(args) -> int:
    start = time.time()
    if args.format == "hf":
        from daulat.checkpoint import load_config

        out = export_hf(args.checkpoint, args.out, args.dtype)
        print(f"wrote {out}: transformers deepseek_v3 directory ({args.dtype or _stored_dtype(Path(args.checkpoint))}, "
              f"no train_state/ or MTP weights) in {time.time() - start:.1f}s")
        print(f"vLLM: {vllm_fit(load_config(out))}")
        return 0
    stats = export_gguf(args.checkpoint, args.out, args.dtype)
    types = ", ".join(f"{n} {t}" for t, n in sorted(stats["types"].items()))
    from daulat.checkpoint import load_config

    arch = gguf_architecture(load_config(Path(args.checkpoint))).name
    print(f"wrote {args.out}: GGUF {arch} for llama.cpp, {stats['tensors']} tensors ({types}), "
          f"{stats['bytes'] / 2**20:.1f} MiB in {time.time() - start:.1f}s")
    return 0
