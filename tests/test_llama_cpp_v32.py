"""llama.cpp runs daulat's DeepSeek-V3.2 GGUF export (llama.cpp's `deepseek32` architecture: DeepSeek-V3's
MLA and MoE plus the lightning indexer and its top-k sparse attention).

A tiny V3.2 model with 16 indexer heads (with fewer, ties among the indexer's ReLU scores make the top-k,
and so the logits, depend on how each side breaks them) is trained briefly, exported with `daulat export`
and loaded with `llama_cpp.Llama`:

  * prompt logits against daulat's forward, with index_topk (16) below the prompt length so that the
    indexer's selection matters (checked: daulat's own dense attention gives other logits), and prompts
    shorter than index_topk (every earlier key kept);
  * greedy continuations decoded by llama.cpp from its caches (latent + indexer keys) equal daulat's;
  * f16, bf16 and q8_0 files stay close, and the k-quants q6_k and q4_k_m (llama.cpp's own quantizer, on
    a model 256 wide) keep most of daulat's argmax;
  * a spread of configurations (YaRN with mscale_all_dim 1, 0.7 and none, top-k 1 and above the context,
    RoPE on only part of the indexer head, all-dense, tied embeddings) gives the same logits;
  * what llama.cpp's deepseek32 cannot run (an indexer head that is not a power of two of at least 64)
    is refused in one line (DeepSeek-V4: tests/test_llama_cpp_v4.py).

Verified with llama-cpp-python 0.3.36 = llama.cpp 0c1e57098. Each test prints one JSON line of figures.
"""

import random

import pytest
import torch
from conftest import require

pytestmark = pytest.mark.slow

llama_cpp = require("llama_cpp")

from test_llama_cpp import SENTENCES, _report, one_thread, tokenizer, train_on_sentences  # noqa: E402,F401

from daulat.checkpoint import save_model  # noqa: E402
from daulat.cli import main  # noqa: E402
from daulat.errors import DaulatError  # noqa: E402
from daulat.export import check_llama_cpp, llama_cpp_plain_buffers, write_gguf  # noqa: E402
from daulat.model_v4 import ModelConfigV4  # noqa: E402
from daulat.model_v32 import DeepseekV32, DeepseekV32Config  # noqa: E402

F32 = 0  # GGML_TYPE_F32: llama.cpp's caches (MLA latent and indexer keys) in float32 for the exactness checks
VOCAB = 448
TOPK = 16
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
V32 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
           num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
           max_position_embeddings=256, index_n_heads=16, index_head_dim=64, index_topk=TOPK,
           rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 0.7})
LONG = " ".join(SENTENCES[:3])  # about 60 tokens: well above TOPK
SHORT = ["The cat sat", "Selamat pagi,", "東京は"]  # below TOPK


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny V3.2 model trained on SENTENCES for 300 steps of 16 x 48 tokens. It trains with index_topk at the
    length (dense attention: V3's speed; the indexer keeps its random weights, which still decide what
    each query sees) and is then run with index_topk = 16."""
    torch.manual_seed(0)
    model = DeepseekV32(DeepseekV32Config(**{**V32, "index_topk": 64}))
    loss = train_on_sentences(model, tokenizer, passes=30, length=48, warmup=10)
    sparse = DeepseekV32(DeepseekV32Config(**V32))
    sparse.load_state_dict(model.state_dict())
    _report(test="train_v32", steps=300, final_loss=round(loss, 4))
    return sparse.eval()


def _load(path):
    with llama_cpp_plain_buffers():
        return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                               n_threads=1, n_threads_batch=1, seed=0, type_k=F32, type_v=F32)


@pytest.fixture(scope="module")
def llm(trained, tokenizer, tmp_path_factory):
    """The trained model saved as a daulat checkpoint and exported with `daulat export --format gguf`."""
    directory = tmp_path_factory.mktemp("export-v32")
    save_model(trained, directory / "ckpt", tokenizer=tokenizer)
    path = directory / "v32-f32.gguf"
    assert main(["export", str(directory / "ckpt"), "--format", "gguf", "--dtype", "f32", "--out", str(path)]) == 0
    model = _load(path)
    assert model.metadata["general.architecture"] == "deepseek32"
    assert model.metadata["deepseek32.attention.indexer.top_k"] == str(TOPK)
    yield model
    model.close()


def _ids(tokenizer, text):
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(llm.scores[: len(ids)].copy())


@torch.no_grad()
def _daulat_logits(model, ids):
    return model(torch.tensor([ids]))[0]


def _compare(model, llm, ids) -> tuple[float, float, float]:
    """(max |llama.cpp - daulat| logit, top-1 agreement, daulat's largest |logit|)."""
    ours, theirs = _daulat_logits(model, ids), _llama_logits(llm, ids)
    assert theirs.shape == ours.shape
    agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    return (theirs - ours).abs().max().item(), agree, ours.abs().max().item()


def test_prompt_logits_agree_above_and_below_top_k(llm, trained, tokenizer):
    long_ids = _ids(tokenizer, LONG)
    assert len(long_ids) > 3 * TOPK
    diff, agree, scale = _compare(trained, llm, long_ids)
    # the indexer's choice matters: with every earlier key kept, daulat's own logits move
    dense = DeepseekV32(DeepseekV32Config(**{**V32, "index_topk": 256}))
    dense.load_state_dict(trained.state_dict())
    sparsity_effect = (_daulat_logits(dense.eval(), long_ids) - _daulat_logits(trained, long_ids)).abs().max().item()
    short = [_compare(trained, llm, _ids(tokenizer, text)) for text in SHORT]
    assert all(len(_ids(tokenizer, text)) < TOPK for text in SHORT)
    _report(test="v32_prompt_logits", tokens=len(long_ids), top_k=TOPK, max_abs_diff=diff, top1_agreement=agree,
            logit_scale=round(scale, 2), sparsity_effect=round(sparsity_effect, 3),
            short_max_abs_diff=max(d for d, _, _ in short))
    assert sparsity_effect > 100 * diff
    assert diff < 1e-4 * scale and agree == 1.0
    assert all(d < 1e-4 * s and a == 1.0 for d, a, s in short)


def test_greedy_continuations_equal_daulats(llm, trained, tokenizer):
    """llama.cpp decodes token by token from its latent and indexer-key caches, past index_topk."""
    n, matched = 12, []
    for text in [SENTENCES[0][:24], *SHORT[:2]]:
        ids = _ids(tokenizer, text)
        ours = list(ids)
        with torch.no_grad():
            for _ in range(n):
                ours.append(int(trained(torch.tensor([ours]))[0, -1].argmax()))
        llm.reset()
        llm.eval(ids)
        theirs = []
        for _ in range(n):
            theirs.append(int(llm.scores[llm.n_tokens - 1].argmax()))
            llm.eval([theirs[-1]])
        matched.append(next((i for i, (a, b) in enumerate(zip(ours[-n:], theirs)) if a != b), n))
        assert len(ids) + n > TOPK
    _report(test="v32_greedy", tokens_each=n, matching_tokens=matched)
    assert matched == [n] * len(matched)


# f16: max |dlogit| measured 1.20 of a logit scale of 11.1 (0.108) with llama-cpp-python 0.3.36 built on an
# AVX-512/AMX Xeon, where the rounded indexer picks other keys at a few positions; top-1 agreement held
@pytest.mark.parametrize("dtype,tolerance,floor", [("f16", 0.15, 0.95), ("bf16", 0.25, 0.9), ("q8_0", 0.25, 0.9)])
def test_smaller_dtypes_stay_close(dtype, tolerance, floor, trained, tokenizer, tmp_path):
    stats = write_gguf(trained, tokenizer, tmp_path / f"v32-{dtype}.gguf", dtype)
    llm = _load(tmp_path / f"v32-{dtype}.gguf")
    try:
        diff, agree, scale = _compare(trained, llm, _ids(tokenizer, LONG))
    finally:
        llm.close()
    _report(test=f"v32_dtype_{dtype}", max_abs_diff=round(diff, 4), top1_agreement=round(agree, 3),
            logit_scale=round(scale, 2), bytes=stats["bytes"])
    assert diff < tolerance * scale and agree >= floor


# k-quants: rows of 256 (hidden, q_lora_rank, kv_lora_rank, moe_intermediate) or 512, so that the blocks apply
WIDE = dict(V32, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, q_lora_rank=256, kv_lora_rank=256,
            qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64, index_head_dim=128, rope_scaling=None)
# (top-1 floor, the main tensors' type). Measured 0.90 and 0.83 over these 109 positions, against 1.0 and
# 0.98 with every key kept: the rounded indexer (its random weights score keys closely) picks other keys
K_QUANT_FLOORS = {"q6_k": (0.85, "Q6_K"), "q4_k_m": (0.8, "Q4_K")}


@pytest.fixture(scope="module")
def wide_checkpoint(tokenizer, tmp_path_factory):
    """A 256-wide V3.2 model trained briefly (dense, as `trained`), saved as a daulat checkpoint."""
    torch.manual_seed(0)
    rng = random.Random(0)
    model = DeepseekV32(DeepseekV32Config(**{**WIDE, "index_topk": 64}))
    docs = [t for _ in range(20) for s in rng.sample(SENTENCES, len(SENTENCES))
            for t in (tokenizer.bos_id, *tokenizer.encode(s), tokenizer.eos_id)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in range(60):
        starts = [rng.randrange(len(docs) - 49) for _ in range(8)]
        chunk = torch.tensor([docs[s : s + 49] for s in starts])
        loss, _ = model.training_loss(chunk[:, :-1], chunk[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    wide = DeepseekV32(DeepseekV32Config(**WIDE))
    wide.load_state_dict(model.state_dict())
    _report(test="train_v32_wide", steps=60, final_loss=round(loss.item(), 4))
    directory = tmp_path_factory.mktemp("wide-v32") / "ckpt"
    save_model(wide, directory, tokenizer=tokenizer)
    return wide.eval(), directory


@pytest.mark.parametrize("dtype", list(K_QUANT_FLOORS))
def test_k_quants_keep_the_argmax(dtype, wide_checkpoint, tokenizer, tmp_path):
    """Through `daulat export`: llama.cpp's own quantizer requantizes an f16 deepseek32 file."""
    gguf = require("gguf")
    wide, directory = wide_checkpoint
    floor, main_type = K_QUANT_FLOORS[dtype]
    path = tmp_path / f"v32-{dtype}.gguf"
    assert main(["export", str(directory), "--format", "gguf", "--dtype", dtype, "--out", str(path)]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.1.ffn_up_exps.weight"] == main_type and types["blk.0.indexer.k_norm.bias"] == "F32"
    llm = _load(path)
    agree, worst = [], 0.0
    try:
        for text in [LONG, *SHORT]:
            ours, theirs = _daulat_logits(wide, _ids(tokenizer, text)), _llama_logits(llm, _ids(tokenizer, text))
            agree += (theirs.argmax(-1) == ours.argmax(-1)).tolist()
            worst = max(worst, (theirs - ours).abs().max().item())
    finally:
        llm.close()
    top1 = sum(agree) / len(agree)
    _report(test=f"v32_k_quant_{dtype}", top1_agreement=round(top1, 4), positions=len(agree),
            max_abs_diff=round(worst, 4), bytes=path.stat().st_size,
            indexer_types=sorted({t for n, t in types.items() if ".indexer." in n}))
    assert top1 >= floor


BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            max_position_embeddings=256, index_n_heads=16, index_head_dim=64, index_topk=8)
SPREAD = {
    "plain_topk_8": {},
    "topk_1_heads_32": {"index_topk": 1, "index_n_heads": 32},
    "topk_above_context": {"index_topk": 512},
    "yarn_mscale_all_dim_1": {"rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}},
    "yarn_no_mscale_head_128": {"rope_scaling": YARN, "index_head_dim": 128},
    "rope_32_of_64_groups_tied": {"qk_rope_head_dim": 32, "n_group": 4, "topk_group": 2, "tie_word_embeddings": True},
    "all_dense": {"first_k_dense_replace": 3, "index_topk": 12},
}


@pytest.mark.parametrize("name", list(SPREAD))
def test_configuration_spread_gives_the_same_logits(name, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = DeepseekV32(DeepseekV32Config(**{**BASE, **SPREAD[name]})).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than init so that attention, routing and the index are far from flat
            p.mul_(4.0) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    llm = _load(tmp_path / "m.gguf")
    try:
        ids = _ids(tokenizer, " ".join(SENTENCES))[:100]  # beyond YaRN's original 32 and the top-k
        diff, agree, scale = _compare(model, llm, ids)
    finally:
        llm.close()
    _report(test=f"v32_config_{name}", max_abs_diff=diff, logit_scale=round(scale, 3))
    assert diff <= 1e-4 * max(scale, 1.0) and agree == 1.0


def test_what_llama_cpp_cannot_run_is_refused_in_one_line():
    for head_dim in (32, 96):
        with pytest.raises(DaulatError, match="index_head_dim.*power of two of at least 64") as error:
            check_llama_cpp(DeepseekV32Config(**{**BASE, "index_head_dim": head_dim}))
        assert "\n" not in str(error.value)
    # DeepSeek-V4 is written as deepseek4 (tests/test_llama_cpp_v4.py), with 4 streams only
    with pytest.raises(DaulatError, match="'hc_mult' = 2: llama.cpp's deepseek4") as error:
        check_llama_cpp(ModelConfigV4())
    assert "\n" not in str(error.value)
