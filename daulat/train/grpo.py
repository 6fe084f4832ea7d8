"""GRPO: critic-free reinforcement learning with verifiable rewards (DeepSeekMath arXiv 2402.03300, R1).

    daulat grpo --init runs/sft --task addition --out runs/grpo --steps 200

Each rollout draws P prompts from the task's training split and samples G completions per prompt
from the inference engine (one prefill per prompt, shared by its G samples). A checker scores each
completion; the advantage of a sample is its reward minus its group's mean (optionally divided by
the group's or the batch's std), so no value network is needed. The policy is then updated with the
clipped importance ratio of PPO, several optimizer steps per rollout if asked:

    ratio_t   = exp(logp_t - logp_old_t)
    loss_t    = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A)   (+ beta * k3_t)
    k3_t      = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1                  (>= 0)

aggregated over the completion tokens as `token` (DAPO: one mean over all tokens), `sequence`
(original GRPO: mean per sequence, then over sequences) or `constant` (Dr. GRPO: sum divided by
sequences x max_tokens). Groups whose rewards are all equal carry no signal and are dropped (or
replaced by new prompts); samples cut off at max_tokens are masked out of the loss; a soft penalty
may discourage answers that approach the limit (DAPO).

The old-policy log-probs of the ratio are recomputed with the training model on exactly the tensors
the update will see (not taken from the engine's decode path), so with no update the ratio is
exactly 1. The engine's own log-probs are kept to report how far the two paths disagree.

GRPO runs on the one training loop of daulat/train/loop.py: `RolloutSource` is its batch source
(a rollout every `minibatches x epochs` steps, then one minibatch per step) and `GRPOObjective` its
objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AGGREGATIONS = ("token", "sequence", "constant")
ADVANTAGE_SCALES = ("group", "batch", "none")
ZERO_VARIANCE = ("drop", "resample", "keep")


# ------------------------------------------------------------------------------------------------
# The math: advantages, the clipped surrogate, k3, aggregation
# ------------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """rewards [P, G] (P groups of G samples) -> advantages [P, G].

    reward - group mean, divided by the group's std (`group`, DeepSeekMath), by the std of all
    rewards in the batch (`batch`, more robust when groups are small) or by nothing (`none`, Dr. GRPO).
    A group whose rewards are all equal gets advantage 0 whatever the scale.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage scale {scale!r}: expected one of {', '.join(ADVANTAGE_SCALES)}")
    rewards = rewards.float()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
        return centered / (std + eps)
    if scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        return centered / (std + eps)
    return centered


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) (Schulman 2020): e^d - d - 1 with d = logp_ref - logp.

    Unbiased for samples drawn from pi, and never negative (e^d >= 1 + d); d is clamped to
    [-clamp, clamp] so that a token the reference finds very unlikely cannot blow the loss up.
    """
    d = (ref_logprobs - logprobs).clamp(-clamp, clamp)
    return (torch.expm1(d) - d).clamp_min(0.0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_tokens: int | None = None) -> torch.Tensor:
    """per_token [N, T] losses, mask [N, T] (1 on the completion tokens that count) -> scalar.

    token:    sum over all tokens / number of tokens (DAPO; long answers weigh by their length)
    sequence: mean over each sequence's tokens, then mean over sequences (original GRPO)
    constant: sum over all tokens / (N x max_tokens) (Dr. GRPO; no length bias either way)
    A sequence with no counted token contributes nothing (and an all-masked batch gives 0).
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if how == "token":
        return masked.sum() / mask.sum().clamp_min(1.0)
    if how == "sequence":
        lengths = mask.sum(dim=1)
        per_sequence = masked.sum(dim=1) / lengths.clamp_min(1.0)
        return per_sequence.sum() / (lengths > 0).sum().clamp_min(1)
    if how == "constant":
        if not max_tokens or max_tokens <= 0:
            raise ValueError("the constant aggregation needs max_tokens > 0")
        return masked.sum() / (per_token.shape[0] * max_tokens)
    raise ValueError(f"loss aggregation {how!r}: expected one of {', '.join(AGGREGATIONS)}")


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


def completion_logprobs(model, input_ids: torch.Tensor, with_entropy: bool = False):
    """Log-probs of each next token under `model`: input_ids [N, T] -> [N, T-1] (position t holds
    log p(input_ids[t+1] | input_ids[:t+1])), and the entropy of each of those distributions [N, T-1]
    when asked. One full forward in float32 softmax: the same numeric path for the old policy, the
    update and the reference, so that identical weights give identical numbers."""
    logits = model(input_ids[:, :-1]).float()
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy
