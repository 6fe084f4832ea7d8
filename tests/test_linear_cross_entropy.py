"""The chunked linear + cross-entropy that training_loss uses gives F.cross_entropy's value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from daulat.model import DeepseekV3, ModelConfig, linear_cross_entropy


def _value_and_grads(loss_fn, h, weight, targets):
    h, weight = h.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = loss_fn(h, weight, targets)
    (3 * loss).backward()  # a non-unit upstream gradient must scale both gradients
    return loss.detach(), h.grad, weight.grad


def _reference(h, weight, targets):
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-100)


# rows from fewer than one chunk to several chunks, with a last partial chunk
@pytest.mark.parametrize("rows,vocab", [(37, 101), (600, 3000), (1100, 2048)])
def test_matches_cross_entropy_with_ignored_targets(rows, vocab):
    torch.manual_seed(0)
    h, weight = torch.randn(rows, 48), torch.randn(vocab, 48) * 0.2
    targets = torch.randint(0, vocab, (rows,))
    targets[::5] = -100
    ref = _value_and_grads(_reference, h, weight, targets)
    ours = _value_and_grads(linear_cross_entropy, h, weight, targets)
    for a, b in zip(ref, ours):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (a - b).abs().max()


def test_every_target_ignored_gives_nan_and_zero_gradients_like_cross_entropy():
    h, weight = torch.randn(5, 8), torch.randn(7, 8)
    loss, grad_h, grad_weight = _value_and_grads(linear_cross_entropy, h, weight, torch.full((5,), -100))
    assert loss.isnan() and grad_h.abs().max() == 0 and grad_weight.abs().max() == 0


def test_without_gradients_it_is_plain_cross_entropy():
    h, weight, targets = torch.randn(9, 8), torch.randn(7, 8), torch.randint(0, 7, (9,))
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, weight, targets), _reference(h, weight, targets))


def test_training_loss_gradients_match_the_unfused_loss(monkeypatch):
    """MTP heads and a tied embedding share the output weight: their gradients must add up as before."""
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                      num_nextn_predict_layers=2, tie_word_embeddings=True)
    model = DeepseekV3(cfg).train()
    ids = torch.randint(0, 61, (2, 20))
    targets = ids.roll(-1, dims=1)
    targets[:, -3:] = -100

    def loss_and_grads():
        model.zero_grad()
        loss, _ = model.training_loss(ids, targets)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    fused_loss, fused_grads = loss_and_grads()
    monkeypatch.setattr("daulat.model.linear_cross_entropy", lambda h, w, t, ignore_index=-100: F.cross_entropy(
        F.linear(h, w).float(), t, ignore_index=ignore_index))
    plain_loss, plain_grads = loss_and_grads()
    assert torch.allclose(fused_loss, plain_loss, atol=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, atol=1e-6, rtol=1e-5), name
