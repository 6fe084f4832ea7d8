"""llama.cpp runs daulat's DeepSeek-V4 GGUF export (llama.cpp's `deepseek4` architecture: shared-KV MQA over
a sliding window, CSA with its lightning indexer and HCA compressed entries, attention sinks, the grouped
output LoRA, hyper-connections over 4 streams, hash-routed and sqrtsoftplus-routed MoE, SwiGLU clamp).

A small V4 model with random, enlarged weights (so that attention, routing, the indexer and the mixers
are far from flat; 16 indexer heads, so that ties among the indexer's ReLU scores do not decide its
top-k) is exported with `daulat export` and loaded with `llama_cpp.Llama`:

  * prompt logits over 200 tokens against daulat's forward: window 16, CSA rate 4 with top-4 of up to
    50 entries, HCA rate 128 (one entry from position 127 on); each of them moves daulat's own logits
    by far more than llama.cpp differs from them (checked by switching it off in daulat);
  * greedy continuations decoded by llama.cpp from its caches, across HCA's first entry, equal daulat's,
    and a prompt fed in batches of 37 tokens gives the same logits;
  * f16, bf16 and q8_0 files stay close;
  * a spread of configurations (YaRN on the compressed layers, tied embeddings, every layer hash-routed
    and no sliding layer, 3 Sinkhorn iterations and other epsilons, a 128-wide indexer, 4 output groups)
    gives the same logits;
  * what llama.cpp's deepseek4 cannot run is refused in one line naming the field.

Verified with llama-cpp-python 0.3.36. Each test prints one JSON line of figures.
"""


import pytest
import torch
from conftest import require
from test_v4 import _perturb

pytestmark = pytest.mark.slow

llama_cpp = require("llama_cpp")

from test_llama_cpp import SENTENCES, _report, one_thread, tokenizer  # noqa: E402,F401
from test_llama_cpp_v32 import _compare, _daulat_logits  # noqa: E402

from daulat.checkpoint import save_model  # noqa: E402
from daulat.cli import main  # noqa: E402
from daulat.errors import DaulatError  # noqa: E402
from daulat.export import check_llama_cpp, llama_cpp_plain_buffers, write_gguf  # noqa: E402
from daulat.model_v4 import DeepseekV4, ModelConfigV4  # noqa: E402

F32 = 0  # GGML_TYPE_F32: llama.cpp's caches in float32 for the exactness checks
CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
V4 = dict(vocab_size=448, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
          head_dim=64, qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=16,
          layer_types=[CSA, HCA, SWA, CSA], compress_rates={CSA: 4, HCA: 128}, index_n_heads=16, index_head_dim=64,
          index_topk=4, hc_mult=4, mlp_layer_types=["hash_moe", "moe", "moe", "moe"], n_routed_experts=8,
          num_experts_per_tok=2, max_position_embeddings=512)
T = 200  # 50 CSA entries (top-4 kept), one HCA entry, the window 16


def _random(overrides=None, seed=1) -> DeepseekV4:
    config = ModelConfigV4(**{**V4, **(overrides or {})})
    model = DeepseekV4(config).eval()
    _perturb(model, config.n_routed_experts, seed)
    with torch.no_grad():  # matrices 4x larger (the mixers' too would saturate their sigmoids)
        for name, p in model.named_parameters():
            if p.dim() > 1 and "hc" not in name:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def model():
    return _random()


def _load(path):
    with llama_cpp_plain_buffers():
        return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                               n_threads=1, n_threads_batch=1, seed=0, type_k=F32, type_v=F32)


@pytest.fixture(scope="module")
def llm(model, tokenizer, tmp_path_factory):
    """The model saved as a daulat checkpoint and exported with `daulat export --format gguf`."""
    directory = tmp_path_factory.mktemp("export-v4")
    save_model(model, directory / "ckpt", tokenizer=tokenizer)
    path = directory / "v4-f32.gguf"
    assert main(["export", str(directory / "ckpt"), "--format", "gguf", "--dtype", "f32", "--out", str(path)]) == 0
    loaded = _load(path)
    assert loaded.metadata["general.architecture"] == "deepseek4"
    assert loaded.metadata["deepseek4.hash_layer_count"] == "1"
    yield loaded
    loaded.close()


def _prompt(tokenizer, n=T):
    ids = [tokenizer.bos_id, *tokenizer.encode(" ".join(SENTENCES))]
    return (ids * (n // len(ids) + 1))[:n]




def _effect(model, ids, **overrides) -> float:
    """How far daulat's own logits move with one part switched off (its weights dropped where it has any)."""
    other = DeepseekV4(ModelConfigV4(**{**V4, **overrides})).eval()
    other.load_state_dict(model.state_dict(), strict=False)
    return (_daulat_logits(other, ids) - _daulat_logits(model, ids)).abs().max().item()


def test_prompt_logits_agree(llm, model, tokenizer):
    ids = _prompt(tokenizer)
    diff, agree, scale = _compare(model, llm, ids)
    effects = {
        "csa_top_k": _effect(model, ids, index_topk=64),  # every finished entry instead of the top 4
        "csa_layers": _effect(model, ids, layer_types=[SWA, HCA, SWA, SWA]),
        "hca_layer": _effect(model, ids, layer_types=[CSA, SWA, SWA, CSA]),
        "window": _effect(model, ids, sliding_window=32),
    }
    _report(test="v4_prompt_logits", tokens=len(ids), max_abs_diff=diff, top1_agreement=agree,
            logit_scale=round(scale, 3), effects={k: round(v, 3) for k, v in effects.items()})
    assert diff < 1e-5 * max(scale, 1.0) and agree == 1.0
    assert all(effect > 1000 * diff for effect in effects.values())


def test_greedy_continuations_equal_daulats(llm, model, tokenizer):
    """llama.cpp decodes token by token from its caches (window, compressor states, entries, indexer keys),
    across HCA's first entry (position 127) and several CSA entries."""
    n, matched = 10, []
    for length in (122, 40):
        ids = _prompt(tokenizer, length)
        ours = list(ids)
        with torch.no_grad():
            for _ in range(n):
                ours.append(int(model(torch.tensor([ours]))[0, -1].argmax()))
        llm.reset()
        llm.eval(ids)
        theirs = []
        for _ in range(n):
            theirs.append(int(llm.scores[llm.n_tokens - 1].argmax()))
            llm.eval([theirs[-1]])
        matched.append(next((i for i, (a, b) in enumerate(zip(ours[-n:], theirs)) if a != b), n))
    _report(test="v4_greedy", tokens_each=n, matching_tokens=matched)
    assert matched == [n] * len(matched)


def test_prompt_in_small_batches_gives_the_same_logits(model, tokenizer, tmp_path):
    """37 tokens a batch: CSA and HCA windows and the indexer's straddle the batches (llama.cpp's states)."""
    write_gguf(model, tokenizer, tmp_path / "v4.gguf", "f32")
    with llama_cpp_plain_buffers():
        loaded = llama_cpp.Llama(model_path=str(tmp_path / "v4.gguf"), n_ctx=512, n_batch=37, n_ubatch=37,
                                 logits_all=True, verbose=False, n_threads=1, n_threads_batch=1, seed=0,
                                 type_k=F32, type_v=F32)
    try:
        diff, agree, scale = _compare(model, loaded, _prompt(tokenizer))
    finally:
        loaded.close()
    _report(test="v4_prompt_batches_of_37", max_abs_diff=diff, top1_agreement=agree)
    assert diff < 1e-5 * max(scale, 1.0) and agree == 1.0


@pytest.mark.parametrize("dtype,tolerance,floor", [("f16", 0.1, 0.97), ("bf16", 0.25, 0.9), ("q8_0", 0.25, 0.85)])
def test_smaller_dtypes_stay_close(dtype, tolerance, floor, model, tokenizer, tmp_path):
    stats = write_gguf(model, tokenizer, tmp_path / f"v4-{dtype}.gguf", dtype)
    loaded = _load(tmp_path / f"v4-{dtype}.gguf")
    try:
        diff, agree, scale = _compare(model, loaded, _prompt(tokenizer))
    finally:
        loaded.close()
    _report(test=f"v4_dtype_{dtype}", max_abs_diff=round(diff, 4), top1_agreement=round(agree, 3),
            logit_scale=round(scale, 3), bytes=stats["bytes"], types=stats["types"])
    assert diff < tolerance * scale and agree >= floor


SPREAD = {
    "yarn_compressed": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
    "tied_topk_1": {"tie_word_embeddings": True, "index_topk": 1},
    "all_hash_no_sliding": {"mlp_layer_types": ["hash_moe"] * 4, "layer_types": [HCA, CSA, CSA, HCA],
                            "num_experts_per_tok": 3},
    "sinkhorn_3_eps": {"hc_sinkhorn_iters": 3, "hc_eps": 1e-3, "rms_norm_eps": 1e-5, "swiglu_limit": 0.5},
    "wide_indexer_4_groups": {"index_head_dim": 128, "head_dim": 128, "o_groups": 4, "qk_rope_head_dim": 32},
    "window_over_prompt_learned": {"sliding_window": 256, "mlp_layer_types": ["moe"] * 4, "norm_topk_prob": False},
}


@pytest.mark.parametrize("name", list(SPREAD))
def test_configuration_spread_gives_the_same_logits(name, tokenizer, tmp_path):
    model = _random(SPREAD[name], seed=2)
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    loaded = _load(tmp_path / "m.gguf")
    try:
        diff, agree, scale = _compare(model, loaded, _prompt(tokenizer, 160))
    finally:
        loaded.close()
    _report(test=f"v4_config_{name}", max_abs_diff=diff, logit_scale=round(scale, 3))
    assert diff < 1e-5 * max(scale, 1.0) and agree == 1.0


REFUSED = [
    ({"hc_mult": 2}, "'hc_mult' = 2: .*4 hyper-connection streams"),
    ({"compress_rates": {CSA: 4, HCA: 8}}, "'compress_rates.heavily_compressed_attention' = 8"),
    ({"compress_rates": {CSA: 8, HCA: 128}}, "'compress_rates.compressed_sparse_attention' = 8"),
    ({"scoring_func": "sigmoid"}, "'scoring_func' = 'sigmoid'"),
    ({"mlp_layer_types": ["moe", "hash_moe", "moe", "moe"]}, "'mlp_layer_types' = .*first layers only"),
    ({"index_head_dim": 32}, "'index_head_dim' = 32: .*power of two of at least 64"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16}},
     "'rope_scaling.beta_fast' = 16"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                       "attention_factor": 0.8}}, "'rope_scaling.attention_factor' = 0.8"),
]


@pytest.mark.parametrize("overrides,match", REFUSED)
def test_what_llama_cpp_cannot_run_is_refused_in_one_line(overrides, match):
    with pytest.raises(DaulatError, match=match) as error:
        check_llama_cpp(ModelConfigV4(**{**V4, **overrides}))
    assert "\n" not in str(error.value)
