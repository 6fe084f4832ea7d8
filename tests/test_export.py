"""daulat export: GGUF for llama.cpp (keys, tensors, tokenizer, dtypes, refusals) and clean transformers
directories. llama.cpp itself runs the exported files in tests/test_llama_cpp.py and, for DeepSeek-V3.2,
tests/test_llama_cpp_v32.py (slow)."""

import json
import math

import pytest
import torch
from conftest import require

gguf = require("gguf")

from daulat.checkpoint import load_model, save_model  # noqa: E402
from daulat.cli import main  # noqa: E402
from daulat.errors import DaulatError  # noqa: E402
from daulat.export import check_k_quant, check_llama_cpp, write_gguf  # noqa: E402
from daulat.model import DeepseekV3, ModelConfig  # noqa: E402
from daulat.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer  # noqa: E402

TEXT = ["The cat sat on the mat. 12 + 34 = 46. Héllo wörld, selamat pagi, 世界 🌏!"] * 40
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            max_position_embeddings=256)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 0.7}
SPREAD = {
    "plain": {},
    "q_lora_groups_yarn": {"q_lora_rank": 24, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3,
                           "routed_scaling_factor": 2.5, "rope_scaling": YARN},
    "rope_halves_yarn_no_mscale": {"rope_interleave": False,
                                   "rope_scaling": {"rope_type": "yarn", "factor": 8.0,
                                                    "original_max_position_embeddings": 32}},
    "no_shared_tied_no_norm": {"n_shared_experts": 0, "tie_word_embeddings": True, "norm_topk_prob": False},
    "all_dense": {"first_k_dense_replace": 3},
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, 300)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = DeepseekV3(ModelConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for moe in model.moe_layers():  # a trained model's bias is not zero
            moe.gate.e_score_correction_bias.normal_(0, 0.2)
    return model


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _f32(tensor):
    """A GGUF tensor as float32 torch, in PyTorch order (ggml's shape reversed)."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(data.copy()).float().reshape(tuple(int(n) for n in reversed(tensor.shape)))


# ------------------------------------------------------------------------------------------------ keys


def test_metadata_has_every_key_llama_cpp_reads(tmp_path, tokenizer):
    model = _model(**SPREAD["q_lora_groups_yarn"])
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32", name="tiny", chat_template=CHAT_TEMPLATE)
    kv, _ = _read(tmp_path / "m.gguf")
    a = "deepseek2."
    expected = {
        "general.architecture": "deepseek2", "general.name": "tiny", "general.file_type": 0,
        a + "vocab_size": 320, a + "context_length": 256, a + "embedding_length": 64, a + "block_count": 3,
        a + "feed_forward_length": 96, a + "attention.head_count": 4, a + "attention.head_count_kv": 1,
        a + "attention.q_lora_rank": 24, a + "attention.kv_lora_rank": 32,
        a + "attention.key_length": 32 + 8, a + "attention.value_length": 32,  # MQA over the latent
        a + "attention.key_length_mla": 16 + 8, a + "attention.value_length_mla": 12,
        a + "rope.dimension_count": 8, a + "rope.scaling.type": "yarn", a + "rope.scaling.original_context_length": 64,
        a + "leading_dense_block_count": 1, a + "expert_feed_forward_length": 32, a + "expert_count": 8,
        a + "expert_used_count": 3, a + "expert_shared_count": 1, a + "expert_weights_norm": True,
        a + "expert_gating_func": 2,  # sigmoid
        a + "expert_group_count": 4, a + "expert_group_used_count": 2,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    for key, value in expected.items():
        assert kv.get(key) == value, (key, kv.get(key))
    approx = {a + "attention.layer_norm_rms_epsilon": 1e-6, a + "rope.freq_base": 10000.0,
              a + "rope.scaling.factor": 4.0, a + "expert_weights_scale": 2.5,
              a + "rope.scaling.yarn_log_multiplier": 0.07}  # 0.1 * mscale_all_dim, as llama.cpp's converter
    for key, value in approx.items():
        assert kv[key] == pytest.approx(value, rel=1e-6), key
    assert a + "rope.scaling.attn_factor" not in kv


def test_yarn_without_mscale_all_dim_cancels_llama_cpps_attention_factor(tmp_path, tokenizer):
    write_gguf(_model(**SPREAD["rope_halves_yarn_no_mscale"]), tokenizer, tmp_path / "m.gguf")
    kv, _ = _read(tmp_path / "m.gguf")
    import math

    assert kv["deepseek2.rope.scaling.attn_factor"] == pytest.approx(1 / (0.1 * math.log(8.0) + 1), rel=1e-6)
    assert "deepseek2.rope.scaling.yarn_log_multiplier" not in kv


def test_group_keys_when_routing_is_not_group_limited_and_when_all_layers_are_dense(tmp_path, tokenizer):
    write_gguf(_model(n_group=4, topk_group=4), tokenizer, tmp_path / "a.gguf")
    kv, _ = _read(tmp_path / "a.gguf")  # llama.cpp aborts on used == count > 1: topk_group == n_group is no limit
    assert (kv["deepseek2.expert_group_count"], kv["deepseek2.expert_group_used_count"]) == (1, 1)
    write_gguf(_model(**SPREAD["all_dense"]), tokenizer, tmp_path / "b.gguf")
    kv, tensors = _read(tmp_path / "b.gguf")
    assert kv["deepseek2.expert_count"] == 0 and kv["deepseek2.expert_used_count"] == 0
    assert kv["deepseek2.leading_dense_block_count"] == 3 and "deepseek2.expert_group_count" not in kv
    assert not any("exps" in name or "shexp" in name for name in tensors)


# ------------------------------------------------------------------------------------------------ tensors


def _expected_shapes(config):
    """llama.cpp's create_tensor shapes (ggml order) for deepseek2, from src/models/deepseek2.cpp."""
    D, V, H = config.hidden_size, config.vocab_size, config.num_attention_heads
    n, r, v, c = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
    I, E, F = config.moe_intermediate_size, config.n_routed_experts, config.intermediate_size
    shapes = {"token_embd.weight": (D, V), "output_norm.weight": (D,)}
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (D, V)
    for i in range(config.num_hidden_layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (D,), b + "attn_kv_a_norm.weight": (c,),
                       b + "attn_kv_a_mqa.weight": (D, c + r), b + "attn_k_b.weight": (n, c, H),
                       b + "attn_v_b.weight": (c, v, H), b + "attn_output.weight": (H * v, D),
                       b + "ffn_norm.weight": (D,)})
        if config.q_lora_rank:
            q = config.q_lora_rank
            shapes.update({b + "attn_q_a.weight": (D, q), b + "attn_q_a_norm.weight": (q,),
                           b + "attn_q_b.weight": (q, H * (n + r))})
        else:
            shapes[b + "attn_q.weight"] = (D, H * (n + r))
        if i < config.first_k_dense_replace:
            shapes.update({b + "ffn_gate.weight": (D, F), b + "ffn_up.weight": (D, F), b + "ffn_down.weight": (F, D)})
        else:
            S = I * max(config.n_shared_experts, 1)
            shapes.update({b + "ffn_gate_inp.weight": (D, E), b + "exp_probs_b.bias": (E,),
                           b + "ffn_gate_exps.weight": (D, I, E), b + "ffn_up_exps.weight": (D, I, E),
                           b + "ffn_down_exps.weight": (I, D, E), b + "ffn_gate_shexp.weight": (D, S),
                           b + "ffn_up_shexp.weight": (D, S), b + "ffn_down_shexp.weight": (S, D)})
    return shapes


@pytest.mark.parametrize("name", list(SPREAD))
def test_tensor_names_and_shapes_are_llama_cpps(name, tmp_path, tokenizer):
    model = _model(**SPREAD[name])
    write_gguf(model, tokenizer, tmp_path / "m.gguf")
    _, tensors = _read(tmp_path / "m.gguf")
    got = {k: tuple(int(n) for n in t.shape) for k, t in tensors.items()}
    assert got == _expected_shapes(model.config)


def _as_llama_cpp_computes(path, config: ModelConfig) -> DeepseekV3:
    """A daulat model with llama.cpp's semantics, filled from the GGUF file: RoPE on adjacent pairs, no YaRN
    factor on cos/sin (the export folds it into the weights), kv_b rebuilt from attn_k_b/attn_v_b, a shared
    expert always present. It must compute what the original model computes."""
    kv, tensors = _read(path)
    rope_scaling = None
    if config.rope_scaling is not None:
        rope_scaling = {**config.rope_scaling, "attention_factor": 1.0}
    shared = max(config.n_shared_experts, 1) if config.first_k_dense_replace < config.num_hidden_layers else 0
    emulated = ModelConfig(**{**config.__dict__, "rope_interleave": True, "rope_scaling": rope_scaling,
                              "n_shared_experts": shared})
    model = DeepseekV3(emulated).eval()
    t = {k: _f32(v) for k, v in tensors.items()}
    state = {"embed_tokens.weight": t["token_embd.weight"], "norm.weight": t["output_norm.weight"],
             "lm_head.weight": t.get("output.weight", t["token_embd.weight"])}
    H, n, v, c = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank
    for i in range(config.num_hidden_layers):
        b, d = f"blk.{i}.", f"layers.{i}."
        state[d + "input_layernorm.weight"] = t[b + "attn_norm.weight"]
        state[d + "post_attention_layernorm.weight"] = t[b + "ffn_norm.weight"]
        if config.q_lora_rank:
            state[d + "self_attn.q_a_proj.weight"] = t[b + "attn_q_a.weight"]
            state[d + "self_attn.q_a_layernorm.weight"] = t[b + "attn_q_a_norm.weight"]
            state[d + "self_attn.q_b_proj.weight"] = t[b + "attn_q_b.weight"]
        else:
            state[d + "self_attn.q_proj.weight"] = t[b + "attn_q.weight"]
        state[d + "self_attn.kv_a_proj_with_mqa.weight"] = t[b + "attn_kv_a_mqa.weight"]
        state[d + "self_attn.kv_a_layernorm.weight"] = t[b + "attn_kv_a_norm.weight"]
        k_b, v_b = t[b + "attn_k_b.weight"], t[b + "attn_v_b.weight"]  # [H, c, n], [H, v, c]
        assert k_b.shape == (H, c, n) and v_b.shape == (H, v, c)
        state[d + "self_attn.kv_b_proj.weight"] = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(H * (n + v), c)
        state[d + "self_attn.o_proj.weight"] = t[b + "attn_output.weight"]
        if i < config.first_k_dense_replace:
            for proj in ("gate", "up", "down"):
                state[d + f"mlp.{proj}_proj.weight"] = t[b + f"ffn_{proj}.weight"]
            continue
        state[d + "mlp.gate.weight"] = t[b + "ffn_gate_inp.weight"]
        state[d + "mlp.gate.e_score_correction_bias"] = t[b + "exp_probs_b.bias"]
        state[d + "mlp.gate_up_proj"] = torch.cat([t[b + "ffn_gate_exps.weight"], t[b + "ffn_up_exps.weight"]], dim=1)
        state[d + "mlp.down_proj"] = t[b + "ffn_down_exps.weight"]
        for proj in ("gate", "up", "down"):
            state[d + f"mlp.shared_experts.{proj}_proj.weight"] = t[b + f"ffn_{proj}_shexp.weight"]
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


@pytest.mark.parametrize("name", list(SPREAD))
def test_gguf_weights_under_llama_cpps_rules_compute_the_same_logits(name, tmp_path, tokenizer):
    """The transformations (kv_b split, RoPE pair order, YaRN factor folding, zero shared expert) keep the
    function: checked here without llama.cpp; tests/test_llama_cpp.py checks llama.cpp itself."""
    model = _model(**SPREAD[name])
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    emulated = _as_llama_cpp_computes(tmp_path / "m.gguf", model.config)
    ids = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        assert (emulated(ids) - model(ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype,bulk", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_dtypes_keep_norms_biases_and_router_in_f32(dtype, bulk, tmp_path, tokenizer):
    model = _model()
    write_gguf(model, tokenizer, tmp_path / "m.gguf", dtype)
    kv, tensors = _read(tmp_path / "m.gguf")
    assert kv["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]
    for name, t in tensors.items():
        kind = t.tensor_type.name
        if len(t.shape) == 1 or name.endswith(("_norm.weight", ".bias")) or "ffn_gate_inp" in name:
            assert kind == "F32", name
        elif dtype == "q8_0" and int(t.shape[0]) % 32:  # llama.cpp's converter falls back to f16 there
            assert kind == "F16", name
        else:
            assert kind == bulk, name
    write_gguf(model, tokenizer, tmp_path / "f.gguf", "f32")
    ref = _f32(_read(tmp_path / "f.gguf")[1]["blk.1.ffn_up_exps.weight"])
    got = _f32(tensors["blk.1.ffn_up_exps.weight"])
    assert (got - ref).abs().max() <= ref.abs().max() * {"f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2}[dtype]


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_is_carried_with_control_tokens_and_padding(tmp_path, tokenizer):
    write_gguf(_model(), tokenizer, tmp_path / "m.gguf")
    kv, _ = _read(tmp_path / "m.gguf")
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == BASE["vocab_size"] > tokenizer.vocab_size
    for i in range(tokenizer.vocab_size):
        assert tokens[i] == tokenizer.id_to_token(i)
    assert tokens[:len(SPECIAL_TOKENS)] == SPECIAL_TOKENS and set(types[:len(SPECIAL_TOKENS)]) == {3}  # CONTROL
    assert set(types[len(SPECIAL_TOKENS):tokenizer.vocab_size]) == {1}  # NORMAL
    assert tokens[-1] == f"[PAD{BASE['vocab_size'] - 1}]" and types[-1] == 5  # UNUSED padding rows
    spec = json.loads(tokenizer.tokenizer.to_str())
    assert kv["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tmp_path, tokenizer):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    from daulat.tokenizer import Tokenizer

    other = HFTokenizer.from_str(tokenizer.tokenizer.to_str())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(DaulatError, match="pre_tokenizer"):
        write_gguf(_model(), Tokenizer(other), tmp_path / "m.gguf")
    with pytest.raises(DaulatError, match="vocab_size is 100"):
        write_gguf(_model(vocab_size=100), tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ refusals

BAD = {
    "attention_bias": {"attention_bias": True},
    "rms_norm_eps": {"rms_norm_eps": 1e-5},
    "q_lora_rank": {"q_lora_rank": 16, "num_hidden_layers": 27},
    "rope_scaling.beta_fast": {"rope_scaling": {**YARN, "beta_fast": 16}},
    "rope_scaling.truncate": {"rope_scaling": {**YARN, "truncate": False}},
    "qk_nope_head_dim": {"qk_nope_head_dim": 0},
}


@pytest.mark.parametrize("field", list(BAD))
def test_a_config_llama_cpp_cannot_compute_is_one_line_naming_the_field(field, tmp_path, tokenizer, capsys):
    config = ModelConfig(**{**BASE, **BAD[field]})
    with pytest.raises(DaulatError, match=f"'{field}'"):
        check_llama_cpp(config)
    save_model(DeepseekV3(config), tmp_path / "ckpt", tokenizer=tokenizer)
    code = main(["export", str(tmp_path / "ckpt"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"'{field}'" in err, err
    assert {p.name for p in tmp_path.iterdir()} == {"ckpt"}  # nothing written, not even a temporary file


def test_gguf_needs_the_tokenizer(tmp_path, capsys):
    save_model(_model(), tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_cli_k_quant_refusals_are_one_line_before_writing(tmp_path, tokenizer, capsys, monkeypatch):
    save_model(_model(), tmp_path / "narrow", tokenizer=tokenizer)
    save_model(_model(hidden_size=256), tmp_path / "wide", tokenizer=tokenizer)
    out = tmp_path / "out" / "m.gguf"
    assert main(["export", str(tmp_path / "narrow"), "--format", "gguf", "--dtype", "q4_k_m", "--out", str(out)]) == 2
    assert "'hidden_size' = 64 is not a multiple of 256" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    assert main(["export", str(tmp_path / "wide"), "--format", "gguf", "--dtype", "q6_k", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'daulat[quantize]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_gguf_default_dtype_is_the_checkpoints(tmp_path, tokenizer, capsys):
    save_model(_model(), tmp_path / "run" / "final", tokenizer=tokenizer)
    assert main(["export", str(tmp_path / "run" / "final"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert "GGUF deepseek2" in capsys.readouterr().out
    kv, _ = _read(tmp_path / "m.gguf")
    assert kv["general.file_type"] == 0 and kv["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert kv["general.name"] == "run-final"


# ------------------------------------------------------------------------------------------------ --format hf


def _full_checkpoint(path, tokenizer):
    model = _model(num_nextn_predict_layers=1)
    save_model(model, path, tokenizer=tokenizer, info={"stage": "pretrain"},
               train_state={"tensors": {"step": torch.tensor(7)}, "meta": {"step": 7}})
    return model


def test_hf_export_is_a_clean_transformers_directory_with_the_same_logits(tmp_path, tokenizer):
    transformers = require("transformers")
    model = _full_checkpoint(tmp_path / "ckpt", tokenizer)
    assert main(["export", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "train_state" not in files and "mtp.safetensors" not in files
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    info = json.loads((tmp_path / "hf" / "daulat.json").read_text())
    assert info["stage"] == "pretrain" and info["export"]["format"] == "hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 30))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4
        assert (load_model(tmp_path / "hf")(ids) - model(ids)).abs().max().item() == 0
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto("selamat pagi 2024", add_special_tokens=False)["input_ids"] == tokenizer.encode("selamat pagi 2024")


def test_hf_export_dtypes_and_refusals(tmp_path, tokenizer, capsys):
    _full_checkpoint(tmp_path / "ckpt", tokenizer)
    ckpt = str(tmp_path / "ckpt")
    assert main(["export", ckpt, "--format", "hf", "--dtype", "bf16", "--out", str(tmp_path / "hf")]) == 0
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    assert main(["export", ckpt, "--format", "hf", "--dtype", "q8_0", "--out", str(tmp_path / "x")]) == 2
    assert "q8_0 is a GGUF type" in capsys.readouterr().err
    assert main(["export", ckpt, "--format", "hf", "--out", ckpt]) == 2
    assert "the checkpoint itself" in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "train_state").is_dir()  # untouched


# ------------------------------------------------------------------------------------------------ DeepSeek-V3.2


def test_v32_writes_llama_cpps_deepseek32_layout(tmp_path, tokenizer):
    """llama.cpp's deepseek32: deepseek2's keys and tensors plus the indexer's (run by llama.cpp in
    tests/test_llama_cpp_v32.py); the head weights stay f32 in q8_0, the YaRN rows of the indexer's
    query carry daulat's cos/sin factor squared."""
    from daulat.model_v32 import DeepseekV32, DeepseekV32Config

    torch.manual_seed(0)
    config = DeepseekV32Config(**{**BASE, "q_lora_rank": 32, "index_n_heads": 4, "index_head_dim": 64,
                                  "index_topk": 8, "rope_scaling": YARN})
    model = DeepseekV32(config).eval()
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0")
    fields, tensors = _read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "deepseek32"
    assert (fields["deepseek32.attention.indexer.head_count"], fields["deepseek32.attention.indexer.key_length"],
            fields["deepseek32.attention.indexer.top_k"]) == (4, 64, 8)
    # llama.cpp's deepseek32 rotates by yarn_mscale(1) / yarn_mscale(mscale_all_dim): cancelled
    assert fields["deepseek32.rope.scaling.attn_factor"] == pytest.approx((0.07 * math.log(4) + 1) /
                                                                          (0.1 * math.log(4) + 1))
    indexer = {n.removeprefix("blk.1.indexer."): t for n, t in tensors.items() if n.startswith("blk.1.indexer.")}
    assert sorted(indexer) == ["attn_k.weight", "attn_q_b.weight", "k_norm.bias", "k_norm.weight", "proj.weight"]
    assert {n: t.tensor_type.name for n, t in indexer.items()} == {
        "attn_k.weight": "Q8_0", "attn_q_b.weight": "Q8_0", "k_norm.bias": "F32", "k_norm.weight": "F32",
        "proj.weight": "F32"}
    assert torch.equal(_f32(indexer["proj.weight"]), model.layers[1].self_attn.indexer.weights_proj.weight)
    write_gguf(model, tokenizer, tmp_path / "f32.gguf", "f32")
    q_b = _f32(_read(tmp_path / "f32.gguf")[1]["blk.1.indexer.attn_q_b.weight"]).view(4, 64, -1)
    ours = model.layers[1].self_attn.indexer.wq_b.weight.view(4, 64, -1)
    factor = float(model.rope_attention_factor) ** 2
    assert factor != 1.0
    torch.testing.assert_close(q_b[:, :8], ours[:, :8] * factor)
    torch.testing.assert_close(q_b[:, 8:], ours[:, 8:], rtol=0, atol=0)


def test_v32_and_v4_refusals_are_one_line():
    from daulat.model_v4 import ModelConfigV4
    from daulat.model_v32 import DeepseekV32Config

    v32 = {**BASE, "q_lora_rank": 32, "index_head_dim": 64}
    for overrides, match in [({"index_head_dim": 48}, "'index_head_dim' = 48: .*power of two of at least 64"),
                             ({"attention_bias": True}, "deepseek32 has no attention biases")]:
        with pytest.raises(DaulatError, match=match) as error:
            check_llama_cpp(DeepseekV32Config(**{**v32, **overrides}))
        assert "\n" not in str(error.value)
    # V4 goes out as llama.cpp's deepseek4 (tests/test_llama_cpp_v4.py): daulat's default 2 streams are refused
    with pytest.raises(DaulatError, match="'hc_mult' = 2: llama.cpp's deepseek4 runs 4 hyper-connection streams") \
            as error:
        check_llama_cpp(ModelConfigV4())
    assert "\n" not in str(error.value)
    with pytest.raises(DaulatError, match="GGUF q4_k_m: config field 'model_type' = 'deepseek_v4'") as error:
        check_k_quant(ModelConfigV4(hidden_size=256), "q4_k_m")
    assert "\n" not in str(error.value)
