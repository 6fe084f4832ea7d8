"""DeepSeek-V3.2 checkpoints through daulat's one loader, both ways with transformers: a directory that
daulat writes loads in `AutoModelForCausalLM` with the same logits, and transformers' `save_pretrained`
loads through `load_checkpoint` with the same logits; the indexer's head weights stay float32."""

import json

import pytest
import torch
from conftest import require

transformers = require("transformers")

from daulat.checkpoint import load_checkpoint, load_model  # noqa: E402
from daulat.errors import DaulatError  # noqa: E402
from daulat.model_v32 import DeepseekV32, DeepseekV32Config  # noqa: E402
from daulat.report import save_documented  # noqa: E402

SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
             num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=12, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
             max_position_embeddings=256, index_n_heads=16, index_head_dim=16, index_topk=8)
T = 33


def _random_v32(seed: int) -> DeepseekV32:
    torch.manual_seed(seed)
    model = DeepseekV32(DeepseekV32Config(**SMALL)).eval()
    with torch.no_grad():
        for moe in model.moe_layers():  # a trained router's bias is not zero: routing depends on the load
            moe.gate.e_score_correction_bias.normal_(0, 0.2)
        for layer in model.layers:
            layer.self_attn.indexer.k_norm.bias.normal_(0, 0.1)
    return model


def test_a_saved_v32_checkpoint_loads_in_transformers_and_back_with_the_same_logits(tmp_path):
    model = _random_v32(0)
    save_documented(model, tmp_path / "ckpt", info={"stage": "init", "preset": "test"})
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and config["architectures"] == ["DeepseekV32ForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    loaded = load_checkpoint(tmp_path / "ckpt").model
    assert type(loaded) is DeepseekV32 and loaded.config == model.config
    ids = torch.randint(0, SMALL["vocab_size"], (2, T))
    with torch.no_grad():
        ours = model(ids)
        assert (ours - hf(ids).logits).abs().max() <= 1e-4
        assert (ours - loaded(ids)).abs().max() == 0


def test_transformers_save_pretrained_loads_through_load_checkpoint_with_the_same_logits(tmp_path):
    torch.manual_seed(1)
    fields = {k: v for k, v in DeepseekV32Config(**SMALL).to_hf_dict().items()
              if k not in ("mtp_loss_weight", "bias_update_speed", "seq_aux_loss_alpha", "num_nextn_predict_layers")}
    hf = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**fields)).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    model = load_checkpoint(tmp_path / "hf").model
    assert type(model) is DeepseekV32
    ids = torch.randint(0, SMALL["vocab_size"], (2, 29))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_bf16_load_keeps_the_indexer_head_weights_and_router_bias_in_float32(tmp_path):
    save_documented(_random_v32(2), tmp_path / "ckpt")
    model = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    attention = model.layers[1].self_attn
    assert attention.indexer.weights_proj.weight.dtype == torch.float32
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert attention.indexer.wq_b.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, SMALL["vocab_size"], (1, T))).float()).all()


@pytest.mark.parametrize("damage,words", [
    ("drop", "missing tensor 'model.layers.1.self_attn.indexer.wk.weight'"),
    ("reshape", "indexer.wk.weight' has shape"),
    ("config", "index_topk"),
])
def test_a_damaged_v32_checkpoint_is_one_line_naming_the_problem(tmp_path, damage, words):
    from safetensors.torch import load_file, save_file

    path = save_documented(_random_v32(3), tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.self_attn.indexer.wk.weight"
    if damage == "drop":
        del tensors[name]
    elif damage == "reshape":
        tensors[name] = tensors[name][:, :-1].contiguous()
    else:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "index_topk": 0}))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DaulatError, match=words.replace("(", r"\(")) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_a_v32_checkpoint_llama_cpp_cannot_run_is_refused_before_any_weight_is_read(tmp_path):
    """GGUF of V3.2 is written (tests/test_llama_cpp_v32.py); an indexer llama.cpp cannot compute
    (head width 16, not a power of two of at least 64) is refused from config.json alone."""
    from daulat.export import export_gguf

    save_documented(_random_v32(0), tmp_path / "ckpt", info={"stage": "init", "preset": "test"})
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not read")  # the refusal comes first
    with pytest.raises(DaulatError, match="index_head_dim' = 16.*power of two"):
        export_gguf(tmp_path / "ckpt", tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
