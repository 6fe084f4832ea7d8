"""GRPO: the math (advantages, clipped ratio, k3, aggregations) and a micro end-to-end run."""

import math

import pytest
import torch

from daulat.config import read_preset
from daulat.model import DeepseekV3, ModelConfig
from daulat.train.grpo import (
    aggregate, clipped_surrogate, completion_logprobs, group_advantages, k3_kl, overlong_penalty,
)


def micro_model(seed=0):
    torch.manual_seed(seed)
    return DeepseekV3(ModelConfig(**read_preset("micro")["model"]))


# ------------------------------------------------------------------------------------------ the math


def test_aggregations_match_hand_computed_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert aggregate(per_token, mask, "token").item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)  # 3.0
    assert aggregate(per_token, mask, "sequence").item() == pytest.approx(((1 + 2 + 3) / 3 + (4 + 5) / 2) / 2)  # 3.25
    assert aggregate(per_token, mask, "constant", max_tokens=4).item() == pytest.approx(15 / (2 * 4))  # 1.875
    # a sequence with nothing counted does not dilute the sequence mean
    mask3 = torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)])
    per3 = torch.cat([per_token, torch.full((1, 4), 7.0)])
    assert aggregate(per3, mask3, "sequence").item() == pytest.approx(3.25)
    assert aggregate(per3, torch.zeros_like(mask3), "token").item() == 0.0
    with pytest.raises(ValueError):
        aggregate(per_token, mask, "mean")


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    none = group_advantages(rewards, "none")
    assert torch.allclose(none, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.75, -0.75, -0.75, 2.25]]))
    group = group_advantages(rewards, "group")
    assert torch.allclose(group[0], none[0] / rewards[0].std(), atol=1e-5)
    assert torch.allclose(group[2], none[2] / rewards[2].std(), atol=1e-5)
    assert group[1].abs().max() == 0  # equal rewards: no signal, and no division by zero
    batch = group_advantages(rewards, "batch")
    assert torch.allclose(batch, none / rewards.std(), atol=1e-5)


def test_k3_is_zero_at_the_reference_and_never_negative():
    torch.manual_seed(0)
    logp = -torch.rand(64, 32) * 10
    assert k3_kl(logp, logp).abs().max() == 0
    for scale in (1e-8, 1e-4, 1.0, 30.0):
        ref = logp + torch.randn_like(logp) * scale
        kl = k3_kl(logp, ref)
        assert (kl >= 0).all() and torch.isfinite(kl).all()
    # the log-ratio is clamped: a token the reference deems impossible costs a bounded amount
    assert k3_kl(torch.tensor([0.0]), torch.tensor([1e4]), clamp=10.0).item() == pytest.approx(math.exp(10) - 10 - 1, rel=1e-5)


def test_clipped_surrogate_clips_only_in_the_direction_of_the_advantage():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]]))
    loss, ratio, clipped = clipped_surrogate(logp, old, torch.tensor([1.0, -1.0]), 0.2, 0.28)
    assert torch.allclose(ratio, logp.exp())
    # A > 0: min(r, clip(r)) -> 0.5 (unclipped below), 1, 1.28; A < 0: -max(r, clip(r)) -> -0.8, -1, -1.5
    assert torch.allclose(loss, torch.tensor([[-0.5, -1.0, -1.28], [0.8, 1.0, 1.5]]))
    assert clipped.tolist() == [[False, False, True], [True, False, False]]


def test_overlong_penalty():
    lengths = torch.tensor([10, 12, 14, 16, 20])
    assert overlong_penalty(lengths, 16, 0).tolist() == [0, 0, 0, 0, 0]
    assert torch.allclose(overlong_penalty(lengths, 16, 4, 1.0), torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


# ------------------------------------------------------------------------------------------ with a model


def test_on_policy_ratio_is_exactly_one_without_an_update():
    model = micro_model()
    ids = torch.randint(6, 500, (6, 30))
    model.eval()
    with torch.no_grad():
        old, _ = completion_logprobs(model, ids)
    model.train()
    new, _ = completion_logprobs(model, ids)
    loss, ratio, clipped = clipped_surrogate(new, old, torch.randn(6), 0.2, 0.28)
    assert torch.equal(ratio, torch.ones_like(ratio)) and not clipped.any()


def test_a_group_with_equal_rewards_gives_zero_gradient():
    model = micro_model()
    ids = torch.randint(6, 500, (4, 20))
    mask = torch.zeros(4, 19)
    mask[:, 8:] = 1
    with torch.no_grad():
        old, _ = completion_logprobs(model, ids)
    advantages = group_advantages(torch.full((1, 4), 0.7), "group").flatten()
    for how in ("token", "sequence", "constant"):
        model.zero_grad()
        logp, _ = completion_logprobs(model, ids)
        loss, _, _ = clipped_surrogate(logp, old, advantages, 0.2, 0.28)
        aggregate(loss, mask, how, max_tokens=19).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.abs().max() == 0 for g in grads), how
