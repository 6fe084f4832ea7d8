"""DeepSeek-V4 trains: every parameter gets a gradient (the CSA indexers through their KL term) and a
few AdamW steps lower the loss on a fixed batch."""

import torch

from daulat.model_v4 import DeepseekV4, ModelConfigV4

MIX = ["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"]


def _batch(config, B=2, T=33, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (B, T + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def test_every_parameter_gets_a_gradient_indexers_included():
    torch.manual_seed(0)
    config = ModelConfigV4(layer_types=MIX, indexer_loss_weight=1.0)
    model = DeepseekV4(config).train()
    ids, targets = _batch(config)
    loss, stats = model.training_loss(ids, targets)
    loss.backward()
    assert {"ce", "indexer"} <= set(stats) and stats["indexer"] > 0
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad
    indexer = model.layers[0].self_attn.compressor.indexer
    assert all(p.grad.abs().sum() > 0 for p in indexer.parameters())


def test_indexer_kl_trains_the_indexer_only():
    """The indexer's input is detached: its KL term moves no parameter outside the indexers."""
    torch.manual_seed(0)
    config = ModelConfigV4(layer_types=MIX, indexer_loss_weight=1.0)
    model = DeepseekV4(config).train()
    ids, targets = _batch(config)
    model.hidden_states(ids)  # a training forward leaves each CSA layer's KL on its attention
    kl = model.layers[0].self_attn.indexer_loss
    kl.backward()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(".compressor.indexer." in n for n in moved)


def test_without_indexer_loss_the_indexer_gets_nothing_and_needs_nothing():
    torch.manual_seed(0)
    config = ModelConfigV4(layer_types=MIX)
    model = DeepseekV4(config).train()
    ids, targets = _batch(config)
    loss, stats = model.training_loss(ids, targets)
    loss.backward()
    assert "indexer" not in stats
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad and all(".compressor.indexer." in n for n in no_grad)


def test_adamw_lowers_the_loss():
    torch.manual_seed(0)
    config = ModelConfigV4(layer_types=MIX, indexer_loss_weight=1.0, seq_aux_loss_alpha=1e-3)
    model = DeepseekV4(config).train()
    ids, targets = _batch(config, T=25)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss, stats = model.training_loss(ids, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_router_bias(1e-3)
        losses.append(float(stats["ce"]))
    assert losses[-1] < losses[0] - 0.5
    assert {"balance", "indexer"} <= set(stats)


def test_indexer_kl_falls_when_the_indexer_trains():
    """With the rest of the model fixed, the KL target is fixed: AdamW on the indexers alone lowers it."""
    torch.manual_seed(0)
    config = ModelConfigV4(layer_types=["compressed_sparse_attention"] * 2 + ["sliding_attention"],
                           indexer_loss_weight=1.0)
    model = DeepseekV4(config).train()
    ids, _ = _batch(config, T=25)
    indexers = [p for n, p in model.named_parameters() if ".indexer." in n]
    optimizer = torch.optim.AdamW(indexers, lr=2e-2)
    kls = []
    for _ in range(6):
        model.hidden_states(ids)  # leaves each CSA layer's KL, whose graph reaches only its indexer
        kl = torch.stack([layer.self_attn.indexer_loss for layer in model.layers[:2]]).mean()
        optimizer.zero_grad()
        kl.backward()
        optimizer.step()
        kls.append(float(kl.detach()))
    assert kls[-1] < 0.8 * kls[0]


def test_bfloat16_keeps_the_float32_islands_and_tracks_float32():
    torch.manual_seed(0)
    config = ModelConfigV4(layer_types=MIX)
    model = DeepseekV4(config).eval()
    ids, _ = _batch(config)
    with torch.no_grad():
        reference = model(ids)
        model.to(torch.bfloat16)
        islands = [p for n, p in model.named_parameters() if "hc" in n or "sinks" in n or "position_bias" in n]
        assert islands and all(p.dtype == torch.float32 for p in islands)
        assert model.embed_tokens.weight.dtype == torch.bfloat16
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_both_expert_routes_clamp_alike():
    """MoE's grouped route (training, prefill) and its few-token route (decoding) agree where the
    SwiGLU clamp bites."""
    torch.manual_seed(0)
    config = ModelConfigV4(swiglu_limit=0.5)
    moe = DeepseekV4(config).layers[1].mlp.train()
    with torch.no_grad():
        moe.gate_up_proj.normal_(0, 1.0)  # pre-activations well past the limit
    x = torch.randn(1, 3, config.hidden_size)
    flat = x.view(3, -1)
    with torch.no_grad():
        routed = moe(x, None).view(3, -1) - moe.shared_experts(flat)
        _, weights, idx = moe.gate(flat)
        few = moe._chosen_experts(flat, weights, idx)
        gate = torch.einsum("nd,nkjd->nkj", flat, moe.gate_up_proj[idx]).chunk(2, dim=-1)[0]
    assert (gate.abs() > 0.5).any()
    assert (routed - few).abs().max() < 1e-5
