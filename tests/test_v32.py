"""DeepSeek-V3.2 (daulat/model_v32.py) against transformers' `DeepseekV32ForCausalLM`: the same weights
give the same logits in both directions, over a spread of configurations and of index_topk against the
sequence length; the sparse path attends over gathered keys only."""

import json

import pytest
import torch
from conftest import require, trained_like_biases

transformers = require("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from daulat.architectures import build_model  # noqa: E402
from daulat.checkpoint import parse_config, to_hf_state_dict  # noqa: E402
from daulat.model import DeepseekV3, ModelConfig  # noqa: E402
from daulat.model_v32 import DeepseekV32, DeepseekV32Config, from_transformers_state_dict  # noqa: E402

# 16 indexer heads: with very few heads, ties in the top-k make even transformers disagree with itself
BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            max_position_embeddings=256, index_n_heads=16, index_head_dim=16, index_topk=8)
T = 33  # sequence length of the parity checks

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}

SPREAD = {
    "topk_8_of_33": {},
    "topk_1": {"index_topk": 1},
    "topk_32_of_33": {"index_topk": 32},
    "topk_equals_length": {"index_topk": T},
    "topk_above_length": {"index_topk": 64},
    "yarn_topk_12": {"rope_scaling": YARN, "index_topk": 12},
    "groups_wide_q_lora": {"q_lora_rank": 48, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3,
                           "routed_scaling_factor": 2.5, "index_topk": 5},
    "tied_no_norm_topk_24_heads": {"tie_word_embeddings": True, "norm_topk_prob": False, "index_n_heads": 24,
                                   "index_topk": 16},
    "attention_bias": {"attention_bias": True, "index_topk": 10},
    "indexer_all_rope_dense_layers": {"index_head_dim": 8, "num_hidden_layers": 4, "first_k_dense_replace": 2,
                                      "n_shared_experts": 2, "index_topk": 6},
    "yarn_wide_indexer": {"rope_scaling": {**YARN, "mscale_all_dim": 0.707}, "index_n_heads": 32,
                          "index_head_dim": 24, "index_topk": 20},
}


def _daulat_model(name: str, seed: int) -> DeepseekV32:
    torch.manual_seed(seed)
    model = DeepseekV32(DeepseekV32Config(**{**BASE, **SPREAD[name]})).eval()
    trained_like_biases(model)
    return model


def _hf_config_dict(config: DeepseekV32Config) -> dict:
    return {k: v for k, v in config.to_hf_dict().items()
            if k not in ("mtp_loss_weight", "seq_aux_loss_alpha", "num_nextn_predict_layers")}


@pytest.mark.parametrize("name", list(SPREAD))
def test_daulat_weights_load_in_transformers_with_same_logits(name, tmp_path):
    _check_daulat_to_transformers(name, tmp_path)


def _check_daulat_to_transformers(name, path):
    model = _daulat_model(name, seed=0)
    main, mtp = to_hf_state_dict(model)
    assert not mtp
    assert "model.layers.0.self_attn.indexer.weights_proj.weight" in main
    save_file(main, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    ids = torch.randint(0, BASE["vocab_size"], (2, T))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("name", list(SPREAD))
def test_transformers_weights_load_in_daulat_with_same_logits(name, tmp_path):
    torch.manual_seed(1)
    hf_config = transformers.DeepseekV32Config(**_hf_config_dict(DeepseekV32Config(**{**BASE, **SPREAD[name]})))
    hf = transformers.DeepseekV32ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for layer in hf.model.layers[hf_config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    config = parse_config(hf.config.to_dict(), "transformers")
    model = build_model(config).eval()
    assert isinstance(model, DeepseekV32)
    missing, unexpected = model.load_state_dict(from_transformers_state_dict(hf.state_dict()), strict=False)
    assert unexpected == [] and missing == [], (missing, unexpected)
    ids = torch.randint(0, BASE["vocab_size"], (2, 29))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_queries_chunked_one_at_a_time_give_the_same_logits_as_transformers(tmp_path, monkeypatch):
    import daulat.model_v32

    monkeypatch.setattr(daulat.model_v32, "CHUNK_NUMBERS", 1)  # the sparse path then runs one query per chunk
    _check_daulat_to_transformers("yarn_topk_12", tmp_path)


def test_with_every_key_selected_it_is_deepseek_v3():
    model = _daulat_model("topk_above_length", seed=2)
    v3_fields = {k: v for k, v in {**BASE, **SPREAD["topk_above_length"]}.items() if not k.startswith("index_")}
    v3 = DeepseekV3(ModelConfig(**v3_fields)).eval()
    state = {k: v for k, v in model.state_dict().items() if ".indexer." not in k}
    v3.load_state_dict(state)
    ids = torch.randint(0, BASE["vocab_size"], (2, T))
    with torch.no_grad():
        assert (model(ids) - v3(ids)).abs().max() <= 1e-5


def test_sparse_training_step_has_gradients_for_attention_and_experts():
    model = _daulat_model("topk_8_of_33", seed=3).train()
    ids = torch.randint(0, BASE["vocab_size"], (2, T))
    loss, _ = model.training_loss(ids, ids.roll(-1, dims=1))
    loss.backward()
    attention = model.layers[1].self_attn
    for p in (attention.kv_b_proj.weight, attention.q_a_proj.weight, attention.kv_a_proj_with_mqa.weight,
              model.layers[1].mlp.gate_up_proj):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("field,value,words", [
    ("q_lora_rank", None, "low-rank query"),
    ("index_topk", 0, "positive integer"),
    ("index_head_dim", 4, "at least qk_rope_head_dim"),
    ("rope_interleave", False, "interleaved"),
    ("num_nextn_predict_layers", 1, "not implemented"),
])
def test_bad_config_is_one_clear_error(field, value, words):
    with pytest.raises(ValueError, match=words):
        DeepseekV32Config(**{**BASE, field: value})


def test_config_json_round_trips_and_other_models_are_refused():
    config = DeepseekV32Config(**{**BASE, "rope_scaling": YARN})
    d = config.to_hf_dict()
    assert d["model_type"] == "deepseek_v32" and d["architectures"] == ["DeepseekV32ForCausalLM"]
    assert DeepseekV32Config.from_hf_dict(json.loads(json.dumps(d))) == config
    with pytest.raises(ValueError, match="deepseek_v32"):
        DeepseekV32Config.from_hf_dict(ModelConfig().to_hf_dict())
    v3 = parse_config(ModelConfig().to_hf_dict(), "v3")  # a deepseek_v3 config.json stays DeepSeek-V3
    assert type(v3) is ModelConfig and type(build_model(v3)) is DeepseekV3
    with pytest.raises(ValueError, match="mlp_layer_types"):
        DeepseekV32Config.from_hf_dict({**d, "mlp_layer_types": ["sparse", "dense", "sparse"]})


@pytest.mark.parametrize("name", ["topk_8_of_33", "topk_above_length", "yarn_topk_12"])
def test_prefill_then_decoding_through_the_cache_equals_the_full_forward(name):
    model = _daulat_model(name, seed=4)
    ids = torch.randint(0, BASE["vocab_size"], (2, T))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, T + 4)
        steps = [model(ids[:, :20], positions=torch.arange(20).expand(2, 20), cache=cache)]
        for t in range(20, T):  # one token at a time: the indexer scores against its cached keys
            steps.append(model(ids[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache))
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-4
    c = model.config
    assert cache.bytes_per_token() == c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim) * 4


def test_gradients_through_the_sparse_attention_equal_transformers(tmp_path):
    model = _daulat_model("topk_8_of_33", seed=5).train()
    save_file(to_hf_state_dict(model)[0], tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                           dtype=torch.float32).train()
    ids = torch.randint(0, BASE["vocab_size"], (2, T))
    probe = torch.randn(2, T, BASE["vocab_size"])  # a loss that weighs every logit differently
    (model(ids) * probe).sum().backward()
    (hf(ids).logits * probe).sum().backward()
    ours, theirs = dict(model.named_parameters()), dict(hf.named_parameters())
    for name in ["layers.1.self_attn.kv_b_proj.weight", "layers.1.self_attn.q_a_proj.weight",
                 "layers.2.self_attn.kv_a_proj_with_mqa.weight", "layers.0.self_attn.o_proj.weight",
                 "embed_tokens.weight"]:
        a, b = ours[name].grad, theirs["model." + name].grad
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), name


def test_a_prompt_prefilled_once_and_copied_to_another_row_decodes_alike():
    model = _daulat_model("topk_8_of_33", seed=6)
    ids = torch.randint(0, BASE["vocab_size"], (1, T))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(3, T)
        cache.rows = [2]  # the prompt goes to cache row 2 only
        model(ids[:, :20], positions=torch.arange(20)[None], cache=cache)
        cache.copy_rows(2, [0], 20)  # latents and indexer keys alike
        cache.rows = [0, 2]
        steps = [model(ids[:, t : t + 1].expand(2, 1), positions=torch.full((2, 1), t), cache=cache)
                 for t in range(20, T)]
    decoded = torch.cat(steps, dim=1)  # [2, T - 20, V]
    assert (decoded - full[:, 20:]).abs().max() <= 1e-4
