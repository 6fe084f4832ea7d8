"""Training DeepSeek-V3.2's lightning indexer as the V3.2 report describes (`model.indexer_mode`): a dense
warm-up that trains only the indexer toward the main attention's distribution (KL), then sparse training
in which the LM loss trains the main model and the KL on the selected keys trains the indexer, its input
detached."""

import pytest
import torch

from daulat.model_v32 import DeepseekV32, DeepseekV32Config

BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            max_position_embeddings=256, index_n_heads=16, index_head_dim=16, index_topk=8)
T = 33


def _model(seed=0, **overrides) -> DeepseekV32:
    torch.manual_seed(seed)
    model = DeepseekV32(DeepseekV32Config(**{**BASE, **overrides})).train()
    with torch.no_grad():  # sharper attention than at random init, so the indexer has something to learn
        for layer in model.layers:
            layer.self_attn.q_b_proj.weight.mul_(8)
            layer.self_attn.kv_b_proj.weight.mul_(8)
    return model


def _ids(seed=0):
    return torch.randint(0, BASE["vocab_size"], (2, T), generator=torch.Generator().manual_seed(seed))


def _indexer_params(model):
    return {n: p for n, p in model.named_parameters() if ".indexer." in n}


def _main_params(model):
    return {n: p for n, p in model.named_parameters() if ".indexer." not in n}


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_every_indexer_parameter_receives_a_gradient(mode):
    model = _model()
    model.indexer_mode = mode
    loss, stats = model.training_loss(_ids(), _ids(1))
    assert stats["indexer_kl"] > 0
    loss.backward()
    for name, p in _indexer_params(model).items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    main = _main_params(model)
    if mode == "warmup":  # the main model is frozen
        assert all(p.grad is None for p in main.values())
    else:  # and trained by the LM loss in sparse training
        assert main["layers.1.self_attn.q_a_proj.weight"].grad.abs().sum() > 0


def test_the_warmup_lowers_the_indexer_kl_and_leaves_the_main_model_unchanged():
    model = _model()
    model.indexer_mode = "warmup"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)  # every parameter offered: only the indexer moves
    kls = []
    for _ in range(6):
        optimizer.zero_grad()
        loss, stats = model.training_loss(_ids(), _ids(1))
        loss.backward()
        optimizer.step()
        model.update_router_bias()
        kls.append(float(stats["indexer_kl"]))
    assert all(b < a for a, b in zip(kls, kls[1:])), kls
    assert kls[-1] < 0.8 * kls[0], kls
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(_indexer_params(model))
    for moe in model.moe_layers():  # the router's correction bias is frozen too
        assert not moe.gate.e_score_correction_bias.any()


def test_in_sparse_training_the_lm_loss_gives_no_gradient_to_the_indexer_and_the_kl_none_to_the_model():
    model = _model()
    ids = _ids()
    with torch.no_grad():
        untrained = model(ids)  # indexer_mode None
    model.indexer_mode = "sparse"
    logits = model(ids)
    assert torch.allclose(logits, untrained, atol=1e-5)  # the same keys selected, the same attention
    lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), _ids(1).flatten())
    indexer, main = _indexer_params(model), _main_params(model)
    grads = torch.autograd.grad(lm, list(indexer.values()), allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads)  # no path at all from the LM loss into the indexer
    kl = model.indexer_loss()
    grads = torch.autograd.grad(kl, list(main.values()), allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads)  # the indexer's input is detached from the main model
    assert all(g is not None for g in torch.autograd.grad(kl, list(indexer.values()), allow_unused=True))


def test_with_every_key_selected_sparse_training_kl_is_the_warmup_kl():
    model = _model(index_topk=64)  # >= T: the selected set is every earlier key
    ids = _ids()
    model.indexer_mode = "warmup"
    _, warm = model.training_loss(ids, ids)
    model.indexer_mode = "sparse"
    _, sparse = model.training_loss(ids, ids)
    assert abs(float(warm["indexer_kl"]) - float(sparse["indexer_kl"])) <= 1e-6
    assert abs(float(warm["ce"]) - float(sparse["ce"])) <= 1e-5


def test_the_kl_is_the_report_formula_on_one_layer():
    """KL(p || softmax(I)) with p the main attention summed over heads and L1-normalised, recomputed here
    from the dense attention weights (MLA's expanded form) and the indexer's scores."""
    model = _model(num_hidden_layers=1, first_k_dense_replace=1, index_topk=64)
    model.indexer_mode = "warmup"
    ids = _ids()
    model.training_loss(ids, ids)
    attention = model.layers[0].self_attn
    with torch.no_grad():
        x = model.layers[0].input_layernorm(model.embed_tokens(ids))
        cos, sin = model.rope(torch.arange(T).expand(2, T), x.dtype)
        H, n, r, c = attention.n_heads, attention.nope, attention.rope, attention.kv_lora_rank
        q_resid = attention.q_a_layernorm(attention.q_a_proj(x))
        q = attention.q_b_proj(q_resid).view(2, T, H, n + r)
        q_pe = _rope(q[..., n:], cos, sin)
        latent, k_pe = attention.kv_a_proj_with_mqa(x).split([c, r], dim=-1)
        kv = attention.kv_b_proj(attention.kv_a_layernorm(latent)).view(2, T, H, -1)
        k_pe = _rope(k_pe[:, :, None], cos, sin).expand(2, T, H, r)
        scores = torch.einsum("bthd,bshd->bhts", torch.cat([q[..., :n], q_pe], -1),
                              torch.cat([kv[..., :n], k_pe], -1)) * attention.scale
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1).sum(1)
        p = p / p.sum(-1, keepdim=True)  # [B, T, S]
        index = attention.indexer(x, q_resid, cos, sin, attention.indexer.keys(x, cos, sin))
        log_q = index.masked_fill(~causal, float("-inf")).log_softmax(-1)
        reference = torch.where(causal, torch.xlogy(p, p) - p * log_q, 0.0).sum(-1).mean()
    assert abs(float(attention.indexer_loss.detach()) - float(reference)) <= 1e-5 * max(1.0, float(reference))


def _rope(x, cos, sin):
    from daulat.model import apply_rope

    return apply_rope(x, cos, sin, True)


def test_eval_mode_and_bad_modes():
    model = _model()
    model.indexer_mode = "sparse"
    model.eval()
    loss, stats = model.training_loss(_ids(), _ids(1))
    assert "indexer_kl" not in stats  # inference and validation never pay for the indexer's loss
    with pytest.raises(ValueError, match="indexer_mode"):
        model.indexer_mode = "dense"
