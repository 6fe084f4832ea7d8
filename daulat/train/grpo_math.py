"""The arithmetic of GRPO (DeepSeekMath arXiv 2402.03300; DAPO; Dr. GRPO), each piece one function:

    advantages  A = (r - mean_group(r)) / scale                       `group_advantages`, ADVANTAGE_SCALES
    ratio_t     = exp(logp_t - logp_old_t)
    loss_t      = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A)   `clipped_surrogate`
    k3_t        = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1  (>= 0)     `k3_kl`
    the loss    aggregated over the completion tokens                  `aggregate`, AGGREGATIONS
    overlong    DAPO's soft length penalty on the reward                `overlong_penalty`

and the log-probs of the training model that all of them read (`completion_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def _group_std(rewards: torch.Tensor) -> torch.Tensor:
    """[P, G] -> [P, 1]: each group's std (DeepSeekMath)."""
    return rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])


def _batch_std(rewards: torch.Tensor) -> torch.Tensor:
    """[P, G] -> []: the std of all rewards in the batch (more robust when groups are small)."""
    return rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())


# advantage_std -> what reward - group mean is divided by (None: nothing, Dr. GRPO)
ADVANTAGE_SCALES = {"group": _group_std, "batch": _batch_std, "none": None}


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """rewards [P, G] (P groups of G samples) -> advantages [P, G]: reward - group mean, divided by
    the scale of ADVANTAGE_SCALES. A group whose rewards are all equal gets 0 whatever the scale."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage scale {scale!r}: expected one of {', '.join(ADVANTAGE_SCALES)}")
    rewards = rewards.float()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    std = ADVANTAGE_SCALES[scale]
    return centered if std is None else centered / (std(rewards) + eps)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) (Schulman 2020): e^d - d - 1 with d = logp_ref - logp.

    Unbiased for samples drawn from pi, and never negative (e^d >= 1 + d); d is clamped to
    [-clamp, clamp] so that a token the reference finds very unlikely cannot blow the loss up.
    """
    d = (ref_logprobs - logprobs).clamp(-clamp, clamp)
    return (torch.expm1(d) - d).clamp_min(0.0)


@dataclass(frozen=True)
class Aggregation:
    """How per-token losses become one number: `total(masked, mask)` over the counted tokens, divided
    by `count(lengths, sequences, max_tokens)` (lengths [N]: counted tokens per sequence). Both halves
    live here so that the loss of one micro-batch and the denominator of a whole optimizer step agree."""

    total: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    count: Callable[[torch.Tensor, int, int | None], float]


def _token_total(masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked.sum()


def _sequence_means_total(masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (masked.sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)).sum()


def _constant_count(lengths: torch.Tensor, sequences: int, max_tokens: int | None) -> float:
    if not max_tokens or max_tokens <= 0:
        raise ValueError("the constant aggregation needs max_tokens > 0")
    return float(sequences * max_tokens)


AGGREGATIONS = {
    # DAPO: one mean over all counted tokens (long answers weigh by their length)
    "token": Aggregation(_token_total, lambda lengths, sequences, max_tokens: float(lengths.sum())),
    # original GRPO: mean over each sequence's tokens, then over the sequences that have any
    "sequence": Aggregation(_sequence_means_total, lambda lengths, sequences, max_tokens: float((lengths > 0).sum())),
    # Dr. GRPO: sum over all tokens / (N x max_tokens): no length bias either way
    "constant": Aggregation(_token_total, _constant_count),
}


def aggregation(how: str) -> Aggregation:
    if how not in AGGREGATIONS:
        raise ValueError(f"loss aggregation {how!r}: expected one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[how]


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_tokens: int | None = None,
              denominator: float | None = None) -> torch.Tensor:
    """per_token [N, T] losses, mask [N, T] (1 on the completion tokens that count) -> scalar, by the
    aggregation `how` of AGGREGATIONS. A sequence with no counted token contributes nothing (and an
    all-masked batch gives 0). `denominator` replaces the count when this batch is one micro-batch of
    a larger optimizer step that is normalised as a whole (see `step_denominator`)."""
    agg = aggregation(how)
    mask = mask.to(per_token.dtype)
    if denominator is None:
        denominator = max(agg.count(mask.sum(dim=1), per_token.shape[0], max_tokens), 1.0)
    return agg.total(per_token * mask, mask) / denominator


def step_denominator(how: str, lengths: list[int], sequences: int, max_tokens: int, grad_accum: int) -> float:
    """What each micro-batch's loss is divided by so that the optimizer step, whose samples have
    `lengths` counted tokens each, is aggregated as a whole (the loop divides each micro-batch's loss
    by grad_accum again, hence / grad_accum here). `sequences`: the step's nominal number of samples."""
    count = aggregation(how).count(torch.tensor(lengths, dtype=torch.float32), sequences, max_tokens)
    return max(count, 1.0) / grad_accum


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token, negated into a loss.

    logprobs, old_logprobs [N, T]; advantages [N] (one per sequence, shared by its tokens).
    Returns (loss [N, T], ratio [N, T], clipped [N, T] bool: where the clipped term was the one taken,
    i.e. where the token gives no gradient).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * adv
    clipped_ratio = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = -torch.minimum(unclipped, clipped_ratio * adv)
    clipped = ((ratio < 1.0 - epsilon_low) & (adv < 0)) | ((ratio > 1.0 + epsilon_high) & (adv > 0))
    return loss, ratio, clipped


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_tokens - buffer, then falling linearly to -penalty
    at max_tokens (and -penalty beyond). lengths [N] -> [N]. buffer 0 switches it off."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    free = max_tokens - buffer
    over = (lengths.float() - free).clamp_min(0.0)
    return -(over / buffer).clamp_max(1.0) * penalty


# ------------------------------------------------------------------------------------------------
# Log-probs with the training model
# ------------------------------------------------------------------------------------------------


def completion_logprobs(model, input_ids: torch.Tensor, with_entropy: bool = False, temperature: float = 1.0):
    """Log-probs of each next token under `model`: input_ids [N, T] -> [N, T-1] (position t holds
    log p(input_ids[t+1] | input_ids[:t+1])), and the entropy of each of those distributions [N, T-1]
    when asked. The policy is the one the rollouts sampled from, softmax(logits / temperature). One
    full forward in float32 softmax: the same numeric path for the old policy, the update and the
    reference, so that identical weights give identical numbers."""
    logits = model(input_ids[:, :-1]).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
