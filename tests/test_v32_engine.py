"""DeepSeek-V3.2 in the engine: greedy decoding through `Engine(model, tokenizer)` (continuous batching,
prompts longer than index_topk, so prefill and decode both attend over selected keys) equals the plain
forward, and `daulat inspect` reports the cache per token that the engine measures."""

import json
import subprocess
import sys

import pytest
import torch

from daulat.infer import Engine, SamplingParams
from daulat.model_v32 import DeepseekV32, DeepseekV32Config, kv_cache_bytes_per_token
from daulat.report import save_documented

TINY = dict(vocab_size=320, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=3, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
            max_position_embeddings=128, index_n_heads=16, index_head_dim=16, index_topk=6)


@pytest.fixture(scope="module")
def tokenizer():
    from daulat.data.tasks import default_corpus
    from daulat.tokenizer import train_tokenizer

    return train_tokenizer(default_corpus(200, seed=0), vocab_size=TINY["vocab_size"])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = DeepseekV32(DeepseekV32Config(**TINY)).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def greedy_plain_forward(model, ids: list[int], max_new: int) -> list[int]:
    """Reference: the whole sequence recomputed by the plain (training) forward at every step."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(max_new):
            out.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            ids.append(out[-1])
    return out


@pytest.mark.slow  # about 20 s on 2 cores: five prompts, each reference token a full forward
def test_engine_greedy_decode_equals_the_full_forward_with_continuous_batching(model, tokenizer):
    prompts = ["The quick brown fox jumps over the lazy dog", "Add 12 and 30.", "x",
               "Once upon a time, in a land far away, there lived a king", "Tell me about the sea and the sky"]
    params = [SamplingParams(temperature=0, max_tokens=8 + 3 * (j % 3), ignore_eos=True) for j in range(len(prompts))]
    engine = Engine(model, tokenizer, max_num_seqs=2)  # fewer slots than prompts: sequences join as others leave
    results = engine.generate(prompts, params)
    assert max(len(r.prompt_token_ids) for r in results) > TINY["index_topk"]  # the sparse path is exercised
    for result, sp in zip(results, params):
        assert result.token_ids == greedy_plain_forward(model, result.prompt_token_ids, sp.max_tokens)


@pytest.mark.slow  # a `daulat inspect` subprocess and an engine: about 5 s
def test_inspect_reports_the_cache_per_token_the_engine_measures(model, tokenizer, tmp_path):
    path = save_documented(model, tmp_path / "ckpt", tokenizer=tokenizer)
    run = subprocess.run([sys.executable, "-m", "daulat.cli", "inspect", str(path), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    kv = facts["kv_cache_bytes_per_token_bf16"]
    c = model.config
    assert kv["mla_latent"] == c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 2
    assert kv["indexer_keys"] == c.num_hidden_layers * c.index_head_dim * 2
    assert kv["total"] == kv["mla_latent"] + kv["indexer_keys"]
    assert facts["architecture"].startswith("DeepseekV32")
    engine = Engine(DeepseekV32(c).to(torch.bfloat16).eval(), None, max_num_seqs=2, max_model_len=32)
    assert engine.runner.cache_bytes_per_token == kv["total"]
    cache = engine.runner.cache
    held = sum(t.numel() * t.element_size() for t in [*cache.entries, *cache.index_keys])
    assert held == 2 * 32 * kv["total"]  # the measured figure is what the cache really allocates
    assert kv_cache_bytes_per_token(c, 4)["total"] == Engine(model, None, max_num_seqs=1).runner.cache_bytes_per_token
