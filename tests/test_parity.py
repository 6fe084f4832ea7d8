"""daulat <-> transformers: the same weights give the same logits, in both directions."""

import json

import pytest
import torch
from conftest import require, trained_like_biases

transformers = require("transformers")

from daulat.checkpoint import load_model, save_model  # noqa: E402
from daulat.model import DeepseekV3, ModelConfig  # noqa: E402

BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            max_position_embeddings=256)

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}

SPREAD = {
    "plain": {},
    "q_lora": {"q_lora_rank": 32},
    "groups": {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3, "routed_scaling_factor": 2.5},
    "dense_layers_shared_experts": {"num_hidden_layers": 4, "first_k_dense_replace": 2, "n_shared_experts": 3},
    "tied_no_norm_topk": {"tie_word_embeddings": True, "norm_topk_prob": False},
    "yarn_q_lora_groups": {"q_lora_rank": 40, "rope_scaling": YARN, "n_group": 2, "topk_group": 1},
    "rope_not_interleaved": {"rope_interleave": False},
    "attention_bias": {"attention_bias": True, "q_lora_rank": 32},
}


def _hf_load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("name", list(SPREAD))
def test_daulat_checkpoint_loads_in_transformers_with_same_logits(name, tmp_path):
    torch.manual_seed(0)
    model = DeepseekV3(ModelConfig(**{**BASE, **SPREAD[name]})).eval()
    trained_like_biases(model)
    save_model(model, tmp_path / "ckpt")
    hf = _hf_load(tmp_path / "ckpt")
    ids = torch.randint(0, BASE["vocab_size"], (2, 33))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("name", ["plain", "groups", "tied_no_norm_topk", "yarn_q_lora_groups"])
def test_transformers_checkpoint_loads_in_daulat_with_same_logits(name, tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig(**{**BASE, **SPREAD[name]}).to_hf_dict()
    for key in ("model_type", "architectures", "qk_head_dim", "head_dim", "dtype", "mtp_loss_weight",
                "seq_aux_loss_alpha"):
        cfg.pop(key)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg)).eval()
    with torch.no_grad():
        for layer in hf.model.layers[cfg["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    ids = torch.randint(0, BASE["vocab_size"], (2, 29))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_fused_expert_tensors_are_read(tmp_path):
    """Some transformers versions store experts fused: experts.gate_up_proj / experts.down_proj."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(2)
    model = DeepseekV3(ModelConfig(**BASE)).eval()
    save_model(model, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for i in range(1, BASE["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts"
        E = BASE["n_routed_experts"]
        gate = torch.stack([tensors[f"{p}.{e}.gate_proj.weight"] for e in range(E)])
        up = torch.stack([tensors[f"{p}.{e}.up_proj.weight"] for e in range(E)])
        fused[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        fused[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(E)])
    save_file(fused, tmp_path / "ckpt" / "model.safetensors")
    ids = torch.randint(0, BASE["vocab_size"], (1, 17))
    with torch.no_grad():
        assert (load_model(tmp_path / "ckpt")(ids) - model(ids)).abs().max() < 1e-6


def test_checkpoint_files_are_the_ecosystems(tmp_path):
    model = DeepseekV3(ModelConfig(**BASE, num_nextn_predict_layers=1))
    save_model(model, tmp_path / "ckpt", info={"stage": "test"})
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "mtp.safetensors", "daulat.json"} <= files
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert not any(k.startswith("model.layers.3.") for k in keys)  # the MTP block lives in mtp.safetensors
    with safe_open(tmp_path / "ckpt" / "mtp.safetensors", "pt") as f:
        assert "model.layers.3.eh_proj.weight" in set(f.keys())
    # and transformers still loads the directory, ignoring the MTP file
    _hf_load(tmp_path / "ckpt")
