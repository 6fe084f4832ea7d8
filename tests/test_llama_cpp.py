"""llama.cpp itself runs daulat's GGUF export (slow: needs llama-cpp-python, which builds llama.cpp).

A tiny MLA + MoE model is trained here for a few hundred steps on a small multilingual text (so that
greedy decoding is meaningful), exported to GGUF f32 and loaded with `llama_cpp.Llama`:

  * tokenization of plain and non-ASCII text, and of the chat template, equals daulat's ids;
  * the logits of each prompt agree with daulat's forward pass;
  * greedy continuations (llama.cpp decoding token by token from its MLA latent cache) equal daulat's
    own greedy output, also through llama-cpp-python's completion and chat APIs;
  * a spread of configurations (low-rank query, YaRN with and without mscale_all_dim, NeoX RoPE halves,
    group-limited routing, no shared expert, tied embeddings, all-dense) gives the same logits;
  * f16, bf16 and q8_0 files load and stay close;
  * the k-quants q4_k_m, q5_k_m and q6_k (llama.cpp's own quantizer, on a model 256 wide so that its
    blocks apply) hold k-quant tensors, tokenize the same and keep daulat's next-token argmax.

Verified with llama-cpp-python 0.3.36 = llama.cpp 0c1e57098. Each test prints one JSON line of figures.
"""

import json
import math
import random

import pytest
import torch
from conftest import require

pytestmark = pytest.mark.slow

llama_cpp = require("llama_cpp")  # llama-cpp-python builds llama.cpp from source once

from daulat.checkpoint import save_model  # noqa: E402
from daulat.cli import main  # noqa: E402
from daulat.errors import DaulatError  # noqa: E402
from daulat.export import gguf_stats, llama_cpp_plain_buffers, write_gguf  # noqa: E402
from daulat.model import DeepseekV3, ModelConfig  # noqa: E402
from daulat.tokenizer import CHAT_TEMPLATE, train_tokenizer  # noqa: E402

F32 = 0  # GGML_TYPE_F32: keep llama.cpp's KV cache in float32 for the exactness checks (its default is f16)

SENTENCES = [
    "The cat sat on the mat and looked at the moon.",
    "Selamat pagi, apa kabar? Saya makan nasi goreng di Jakarta.",
    "Grüße aus München: Der Fluss fließt ruhig durch die Stadt.",
    "Café crème, s'il vous plaît, et un croissant au beurre.",
    "東京は日本の首都です。今日は天気がいいですね。",
    "Counting: 1 2 3 4 5 6 7 8 9 10, then 11 12 13 14 15.",
    "Sovereignty means a lab can train its own model on its own data.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Привет, мир! Как дела? Всё хорошо.",
    "The quick brown fox jumps over the lazy dog 7 times.",
]
PROMPTS = ["The cat sat", "Selamat pagi,", "東京は", "Counting: 1 2 3", "def add(a, b):"]
STRINGS = SENTENCES + [
    "", " ", "  two  spaces\tand\ttabs\n\nnewlines\r\n", "trailing space ", "12345678901234567890",
    "emoji 😀👍🏽👨‍👩‍👧 🇮🇩", "नमस्ते दुनिया", "e\u0301 combining", "zero\u200bwidth",
    "mixed日本語text123abc",
    "'s 've 're 'll 'd 'm 't", "x" * 300, "\x00\x01\x7f controls",
]
VOCAB = 448  # the tokenizer uses fewer ids: the rest are padding rows ([PADn] tokens in the GGUF)
TRAINED = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=192, moe_intermediate_size=48,
               num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
               num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=1.5,
               max_position_embeddings=256,
               rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                             "mscale": 1.0, "mscale_all_dim": 1.0})


def _report(**figures):
    print(json.dumps(figures, ensure_ascii=False))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Both sides on one thread: for models this small, a second thread only adds synchronisation, and
    on a busy machine its spin-waiting costs ten times the work (measured: 1.5 s vs 0.09 s of CPU per
    training step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(SENTENCES * 20, 400, min_frequency=2)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny model trained on SENTENCES (documents <|bos|> text <|eos|>, as daulat's shards) until it
    has them nearly by heart: a few hundred AdamW steps, about half a minute on 2 CPU cores."""
    torch.manual_seed(0)
    model = DeepseekV3(ModelConfig(**TRAINED))
    loss = train_on_sentences(model, tokenizer, passes=40, length=64, warmup=20)
    _report(test="train", steps=300, final_loss=round(loss, 4))
    return model.eval()


def train_on_sentences(model, tokenizer, passes: int, length: int, warmup: int, steps: int = 300,
                       batch: int = 16) -> float:
    """Train `model` on SENTENCES (documents <|bos|> text <|eos|>, `passes` shuffled passes as one
    stream) with AdamW at 3e-3, linear warm-up then cosine decay; returns the last loss."""
    rng = random.Random(0)
    docs = [[tokenizer.bos_id, *tokenizer.encode(s), tokenizer.eos_id] for s in SENTENCES]
    stream = [t for _ in range(passes) for d in rng.sample(docs, len(docs)) for t in d]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        starts = [rng.randrange(len(stream) - length - 1) for _ in range(batch)]
        chunk = torch.tensor([stream[s : s + length + 1] for s in starts])
        loss, _ = model.training_loss(chunk[:, :-1], chunk[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        optimizer.step()
        model.update_router_bias(1e-3)
    return loss.item()


@pytest.fixture(scope="module")
def llm(trained, tokenizer, tmp_path_factory):
    """The trained model saved as a daulat checkpoint and exported with `daulat export --format gguf`."""
    directory = tmp_path_factory.mktemp("export")
    save_model(trained, directory / "ckpt", tokenizer=tokenizer)
    path = directory / "trained-f32.gguf"
    assert main(["export", str(directory / "ckpt"), "--format", "gguf", "--dtype", "f32", "--out", str(path)]) == 0
    model = _load(path)
    assert model.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    yield model
    model.close()


def _load(path, **kwargs):
    with llama_cpp_plain_buffers():  # see its docstring: llama.cpp on a CPU with AMX
        return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                               n_threads=1, n_threads_batch=1, seed=0, type_k=F32, type_v=F32, **kwargs)


def _prompt_ids(tokenizer, text):
    """How daulat encodes a completion prompt: a document starts with <|bos|> (add_bos_token in the GGUF)."""
    return [tokenizer.bos_id, *tokenizer.encode(text)]


@torch.no_grad()
def _daulat_greedy(model, ids, n):
    """Plain greedy decoding with daulat's full forward pass (no cache): argmax, append, repeat."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def _llama_greedy(llm, ids, n):
    """Greedy decoding in llama.cpp: the prompt as one batch, then one token at a time from its cache."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([out[-1]])
    return out


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(llm.scores[: len(ids)].copy())


# ------------------------------------------------------------------------------------------------ tokenizer


def test_llama_cpp_tokenizes_exactly_as_daulat(llm, tokenizer):
    checked = 0
    for text in STRINGS:
        ids = tokenizer.encode(text)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids, text
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == [tokenizer.bos_id, *ids], text
        assert llm.detokenize(ids).decode("utf-8") == text
        checked += 1
    conversation = [{"role": "system", "content": "Jawab singkat."}, {"role": "user", "content": "Apa kabar? 😀"},
                    {"role": "assistant", "content": "Baik, 123!"}, {"role": "user", "content": "東京は?"}]
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    rendered = tokenizer.decode(ids)
    assert llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True) == ids
    # what llama-cpp-python's chat API does: the GGUF's Jinja template, then special-token parsing
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                                                eos_token="<|eos|>", bos_token="<|bos|>")
    result = formatter(messages=conversation)
    assert llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True) == ids
    assert llm.token_bos() == tokenizer.bos_id and llm.token_eos() == tokenizer.eos_id
    _report(test="tokenization", strings=checked, chat_tokens=len(ids))


# ------------------------------------------------------------------------------------------------ trained model


def test_prompt_logits_agree(llm, trained, tokenizer):
    worst = 0.0
    for text in PROMPTS + SENTENCES[:3]:
        ids = _prompt_ids(tokenizer, text)
        with torch.no_grad():
            ours = trained(torch.tensor([ids]))[0]
        theirs = _llama_logits(llm, ids)
        assert theirs.shape == ours.shape
        worst = max(worst, (theirs - ours).abs().max().item())
        assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    _report(test="prompt_logits", max_abs_diff=worst, logit_scale=round(ours.abs().max().item(), 2))
    assert worst < 1e-3


def test_greedy_continuations_equal_daulats(llm, trained, tokenizer):
    n = 24
    matched = []
    for text in PROMPTS:
        ids = _prompt_ids(tokenizer, text)
        ours, theirs = _daulat_greedy(trained, ids, n), _llama_greedy(llm, ids, n)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), n)
        matched.append(same)
        assert same >= 16, (text, tokenizer.decode(ours), tokenizer.decode(theirs))
    _report(test="greedy", prompts=len(PROMPTS), tokens_each=n, matching_tokens=matched,
            sample=PROMPTS[0] + tokenizer.decode(_daulat_greedy(trained, _prompt_ids(tokenizer, PROMPTS[0]), 12)))


def test_completion_and_chat_apis_decode_what_daulat_decodes(llm, trained, tokenizer):
    """Through llama-cpp-python's own sampler (temperature 0) and prompt handling, stopping at <|eos|>.
    It may run a token or two past max_tokens to finish a UTF-8 character: compare what it generated."""

    def expected(prompt_ids, n_generated):
        ours = _daulat_greedy(trained, prompt_ids, n_generated)
        return tokenizer.decode(ours[: ours.index(tokenizer.eos_id)] if tokenizer.eos_id in ours else ours)

    for text in PROMPTS[:3]:
        llm.reset()
        out = llm.create_completion(text, max_tokens=16, temperature=0.0)
        generated = out["usage"]["completion_tokens"]
        assert generated >= 16 or out["choices"][0]["finish_reason"] == "stop"
        assert out["choices"][0]["text"] == expected(_prompt_ids(tokenizer, text), generated), text
    messages = [{"role": "user", "content": "The cat sat"}]
    llm.reset()
    out = llm.create_chat_completion(messages, max_tokens=12, temperature=0.0)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert out["usage"]["prompt_tokens"] == len(prompt)
    # an answer that starts inside a UTF-8 character: daulat shows the stray bytes as U+FFFD, llama-cpp-python's
    # chat completion leaves them out; the characters after them must agree
    assert out["choices"][0]["message"]["content"] == expected(prompt, out["usage"]["completion_tokens"]).lstrip("\ufffd")


@pytest.mark.parametrize("dtype,tolerance", [("f16", 0.05), ("bf16", 0.25), ("q8_0", 0.25)])
def test_smaller_dtypes_load_and_stay_close(dtype, tolerance, trained, tokenizer, tmp_path):
    write_gguf(trained, tokenizer, tmp_path / f"m-{dtype}.gguf", dtype)
    llm = _load(tmp_path / f"m-{dtype}.gguf")
    try:
        ids = _prompt_ids(tokenizer, SENTENCES[0])
        with torch.no_grad():
            ours = trained(torch.tensor([ids]))[0]
        theirs = _llama_logits(llm, ids)
        diff = (theirs - ours).abs().max().item()
        agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    finally:
        llm.close()
    size = (tmp_path / f"m-{dtype}.gguf").stat().st_size
    _report(test=f"dtype_{dtype}", max_abs_diff=round(diff, 4), top1_agreement=agree, bytes=size)
    assert diff < tolerance * ours.abs().max().item() and agree >= 0.9


# ------------------------------------------------------------------------------------------------ k-quants

# k-quant blocks are 256 numbers of a row: rows here are 256 (hidden, kv_lora_rank, heads * v_head_dim,
# moe_intermediate) or 512 long, except attn_k_b's qk_nope_head_dim, which llama.cpp stores in a fallback type
WIDE = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=256, qk_nope_head_dim=32, qk_rope_head_dim=32,
            v_head_dim=64, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
            max_position_embeddings=256)
# (top-1 floor, what the dtype's main tensors must be); measured 1.0, 1.0, 0.96 over these 131 positions
K_QUANT_FLOORS = {"q6_k": (0.95, "Q6_K"), "q5_k_m": (0.9, "Q5_K"), "q4_k_m": (0.85, "Q4_K")}


@pytest.fixture(scope="module")
def wide(tokenizer):
    """A 256-wide model trained briefly on SENTENCES, so that its next-token argmax is not a coin toss."""
    torch.manual_seed(0)
    rng = random.Random(0)
    model = DeepseekV3(ModelConfig(**WIDE))
    docs = [t for _ in range(20) for s in rng.sample(SENTENCES, len(SENTENCES))
            for t in (tokenizer.bos_id, *tokenizer.encode(s), tokenizer.eos_id)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in range(60):
        starts = [rng.randrange(len(docs) - 65) for _ in range(8)]
        chunk = torch.tensor([docs[s : s + 65] for s in starts])
        loss, _ = model.training_loss(chunk[:, :-1], chunk[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _report(test="train_wide", steps=60, final_loss=round(loss.item(), 4))
    return model.eval()


@pytest.fixture(scope="module")
def wide_checkpoint(wide, tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("wide") / "ckpt"
    save_model(wide, directory, tokenizer=tokenizer)
    return directory


@pytest.mark.parametrize("dtype", list(K_QUANT_FLOORS))
def test_k_quants_hold_k_quant_tensors_and_keep_the_argmax(dtype, wide, wide_checkpoint, tokenizer, tmp_path):
    """Through `daulat export`: an f16 file requantized by llama.cpp, then read back by both gguf and llama.cpp."""
    gguf = require("gguf")
    floor, main_type = K_QUANT_FLOORS[dtype]
    path = tmp_path / f"m-{dtype}.gguf"
    assert main(["export", str(wide_checkpoint), "--format", "gguf", "--dtype", dtype, "--out", str(path)]) == 0
    stats = gguf_stats(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the temporaries are gone
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up.weight"] == main_type and types["blk.1.ffn_up_exps.weight"] == main_type
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert stats["types"].get(main_type, 0) >= len(types) // 3
    llm = _load(path)
    agree, errors = [], []
    try:
        for text in PROMPTS + SENTENCES[:3]:
            assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == _prompt_ids(tokenizer, text)
            ids = _prompt_ids(tokenizer, text)
            with torch.no_grad():
                ours = wide(torch.tensor([ids]))[0]
            theirs = _llama_logits(llm, ids)
            agree += (theirs.argmax(-1) == ours.argmax(-1)).tolist()
            errors.append((theirs - ours).abs())
    finally:
        llm.close()
    errors = torch.cat([e.flatten() for e in errors])
    top1 = sum(agree) / len(agree)
    _report(test=f"k_quant_{dtype}", top1_agreement=round(top1, 4), positions=len(agree),
            max_abs_diff=round(errors.max().item(), 4), mean_abs_diff=round(errors.mean().item(), 4),
            bytes=stats["bytes"], types=stats["types"])
    assert top1 >= floor


def test_k_quant_needs_k_quant_rows(tokenizer, tmp_path):
    with pytest.raises(DaulatError, match="'hidden_size' = 64 is not a multiple of 256"):
        write_gguf(DeepseekV3(ModelConfig(**BASE)), tokenizer, tmp_path / "m.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ configurations

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            max_position_embeddings=256)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
SPREAD = {
    "plain": {},
    "q_lora": {"q_lora_rank": 24},
    "groups_scaled": {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3, "routed_scaling_factor": 2.5},
    "groups_not_limiting": {"n_group": 2, "topk_group": 2},
    "yarn_mscale_all_dim": {"rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}},
    "yarn_mscale_differs": {"rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.7}, "q_lora_rank": 24},
    "yarn_plain": {"rope_scaling": YARN},
    "rope_halves": {"rope_interleave": False},
    "rope_halves_yarn": {"rope_interleave": False, "rope_scaling": {**YARN, "mscale": 0.8, "mscale_all_dim": 0.8}},
    "no_shared_tied_no_norm": {"n_shared_experts": 0, "tie_word_embeddings": True, "norm_topk_prob": False},
    "two_shared_two_dense": {"num_hidden_layers": 4, "first_k_dense_replace": 2, "n_shared_experts": 2},
    "all_dense": {"first_k_dense_replace": 3},
}


@pytest.mark.parametrize("name", list(SPREAD))
def test_configuration_spread_gives_the_same_logits(name, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = DeepseekV3(ModelConfig(**{**BASE, **SPREAD[name]})).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than init so that attention and routing are far from uniform
            p.mul_(4.0) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.3)
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    llm = _load(tmp_path / "m.gguf")
    try:
        ids = [tokenizer.bos_id, *tokenizer.encode(" ".join(SENTENCES))][:120]  # beyond YaRN's original 32
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0]
        theirs = _llama_logits(llm, ids)
        greedy_ours, greedy_theirs = _daulat_greedy(model, ids[:20], 8), _llama_greedy(llm, ids[:20], 8)
    finally:
        llm.close()
    diff = (theirs - ours).abs().max().item()
    scale = ours.abs().max().item()
    _report(test=f"config_{name}", max_abs_diff=diff, logit_scale=round(scale, 3))
    assert diff <= 1e-4 * max(scale, 1.0)
    assert greedy_theirs == greedy_ours
