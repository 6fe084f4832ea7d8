"""DeepSeek-V4: logits equal transformers' `DeepseekV4ForCausalLM` in both directions of weight loading."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

from daulat.model_v4 import DeepseekV4, ModelConfigV4, from_hf_state_dict_v4, to_hf_state_dict_v4  # noqa: E402

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}

# name -> (config overrides, sequence length, batch). Every CSA config keeps index_topk below the
# number of compressed entries, so the indexer's choice decides the logits.
CONFIGS = {
    "mix-hc2-hash": ({}, 40, 2),
    "mix-hc1": ({"hc_mult": 1}, 40, 2),
    "sliding-only-hc3": ({"layer_types": ["sliding_attention"] * 3, "hc_mult": 3}, 24, 2),
    "csa-only-learned": ({"layer_types": ["compressed_sparse_attention"] * 3, "mlp_layer_types": ["moe"] * 3,
                          "index_topk": 3}, 37, 2),
    "hca-only-hash": ({"layer_types": ["heavily_compressed_attention"] * 3, "mlp_layer_types": ["hash_moe"] * 3,
                       "compress_rates": {"heavily_compressed_attention": 4}}, 30, 1),
    "yarn-compress": ({"rope_scaling": YARN, "max_position_embeddings": 128,
                       "layer_types": ["compressed_sparse_attention", "heavily_compressed_attention",
                                       "sliding_attention"]}, 45, 2),
    "sigmoid-tied-4groups": ({"scoring_func": "sigmoid", "tie_word_embeddings": True, "o_groups": 4,
                              "q_lora_rank": 24, "qk_rope_head_dim": 16}, 33, 2),
    "window-over-length": ({"sliding_window": 64, "index_topk": 5, "hc_mult": 4,
                            "num_experts_per_tok": 3}, 29, 3),
    "deep-pro-like": ({"num_hidden_layers": 5, "layer_types": ["heavily_compressed_attention"] * 2 +
                       ["compressed_sparse_attention", "heavily_compressed_attention", "compressed_sparse_attention"],
                       "mlp_layer_types": ["hash_moe"] * 2 + ["moe"] * 3, "routed_scaling_factor": 2.5}, 36, 1),
}


def _perturb(model: torch.nn.Module, n_experts: int, seed: int) -> None:
    """Random values everywhere (biases, sinks and routing tables too), large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            big = any(key in name for key in ("bias", "sinks", "base", "scale"))
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if big else 0.1))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(n_experts, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def _pair(overrides):
    config = ModelConfigV4(**overrides)
    hf_config = DeepseekV4Config(**config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    return config, DeepseekV4ForCausalLM(hf_config).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_weights_load_into_daulat(name):
    overrides, T, B = CONFIGS[name]
    config, hf = _pair(overrides)
    _perturb(hf, config.n_routed_experts, seed=1)
    ours = DeepseekV4(config).eval()
    ours.load_state_dict(from_hf_state_dict_v4(hf.state_dict()), strict=True)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert expected.abs().max() > 0.05  # logits carry signal, not just noise around zero
    assert (got - expected).abs().max() <= 1e-4


def _save(model: DeepseekV4, path) -> None:
    """A checkpoint directory as transformers reads it: config.json and published tensor names."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in to_hf_state_dict_v4(model).items()}, str(path / "model.safetensors"))


@pytest.mark.parametrize("name", CONFIGS)
def test_daulat_checkpoint_loads_into_transformers(name, tmp_path):
    overrides, T, B = CONFIGS[name]
    config = ModelConfigV4(**overrides)
    ours = DeepseekV4(config).eval()
    _perturb(ours, config.n_routed_experts, seed=3)
    _save(ours, tmp_path / "ckpt")
    hf, info = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager",
                                                     output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (hf.eval()(ids).logits - ours(ids)).abs().max() <= 1e-4


def test_transformers_checkpoint_loads_into_daulat(tmp_path):
    """A directory written by transformers' save_pretrained (its own mix of published names)."""
    config, hf = _pair(CONFIGS["deep-pro-like"][0])
    _perturb(hf, config.n_routed_experts, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    ours = DeepseekV4(ModelConfigV4.from_hf_dict(hf_config)).eval()
    ours.load_state_dict(from_hf_state_dict_v4(load_file(str(tmp_path / "hf" / "model.safetensors"))), strict=True)
    ids = torch.randint(0, config.vocab_size, (1, 36), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4


def test_indexer_choice_decides_the_logits():
    """Guards the parity tests against a sparse branch that does not matter: letting the indexer keep
    every entry changes the logits."""
    config, hf = _pair(CONFIGS["csa-only-learned"][0])
    _perturb(hf, config.n_routed_experts, seed=1)
    ours = DeepseekV4(config).eval()
    ours.load_state_dict(from_hf_state_dict_v4(hf.state_dict()))
    ids = torch.randint(0, config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sparse = ours(ids)
        for layer in ours.layers:
            layer.self_attn.compressor.indexer.topk = 1000
        dense = ours(ids)
    assert (sparse - dense).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["mix-hc2-hash", "yarn-compress", "sigmoid-tied-4groups"])
def test_config_round_trips_through_transformers(name):
    config = ModelConfigV4(**CONFIGS[name][0])
    hf_dict = DeepseekV4Config(**config.to_hf_dict()).to_dict()
    assert ModelConfigV4.from_hf_dict(hf_dict) == config


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfigV4(layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfigV4(num_key_value_heads=2)


def test_cached_decode_equals_transformers_cached_decode():
    """Chunked prefill then single tokens, through daulat's cache and through transformers' own."""
    from transformers import DynamicCache

    config, hf = _pair({"layer_types": ["compressed_sparse_attention", "heavily_compressed_attention",
                                        "sliding_attention"], "sliding_window": 6, "index_topk": 3})
    _perturb(hf, config.n_routed_experts, seed=1)
    ours = DeepseekV4(config).eval()
    ours.load_state_dict(from_hf_state_dict_v4(hf.state_dict()))
    ids = torch.randint(0, config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    hf_cache, our_cache = DynamicCache(config=hf.config), ours.make_cache(2, 30)
    start = 0
    with torch.no_grad():
        for size in [9, 1, 1, 1, 6, 1, 11]:
            chunk = ids[:, start : start + size]
            expected = hf(chunk, cache=hf_cache, use_cache=True).logits
            got = ours(chunk, (start + torch.arange(size)).expand(2, -1), our_cache)
            assert (got - expected).abs().max() <= 1e-4
            start += size


def test_a_missing_expert_tensor_is_named():
    ours = DeepseekV4(ModelConfigV4())
    state = to_hf_state_dict_v4(ours)
    del state["layers.1.ffn.experts.2.w3.weight"]
    with pytest.raises(ValueError, match="'layers.1.ffn.experts.2.w3.weight'"):
        from_hf_state_dict_v4(state)
