"""The losses of distillation, per position (rows of logits [N, V] -> [N]), and the objectives built on
them: forward KL on sequences (`ForwardKLObjective`, Hinton et al. 2015) and on-policy reverse KL on
the student's own samples (`ReverseKLObjective`, GKD / MiniLLM), exact over the vocabulary or by its
policy-gradient surrogate. The functions tested here are the ones the objectives train with.
"""

from __future__ import annotations

import torch.nn.functional as F

from daulat.data.conversations import IGNORE_INDEX


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """T^2 * KL(p_t || p_s) with p = softmax(logits / T), per row: [N, V], [N, V] -> [N].

    The T^2 keeps the gradient's size independent of T (Hinton et al. 2015). Mass-covering: the
    student is pushed to put probability wherever the teacher does."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * temperature**2


def reverse_kl(student_logits, teacher_logits):
    """KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v)), per row: [N, V], [N, V] -> [N].

    Mode-seeking: the student is pushed off the tokens the teacher finds unlikely, which is what an
    on-policy student needs (its own mistakes are where it learns)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (s.exp() * (s - t)).sum(-1)


def reverse_kl_policy_gradient(student_logprobs, teacher_logprobs):
    """The policy-gradient surrogate of the reverse KL on sampled tokens, per token: [N], [N] -> [N].

    student_logprobs: log p_s of each sampled token (with gradient); teacher_logprobs: log p_t of it.
    The reward of a token is -(log p_s - log p_t) (detached); minimising -reward * log p_s has, over
    tokens drawn from p_s, the expected gradient of KL(p_s || p_t) at that position. Its value is not
    the KL; the KL estimate is log p_s - log p_t itself."""
    reward = -(student_logprobs - teacher_logprobs).detach()
    return -reward * student_logprobs


def balance_loss(model):
    """The student's sequence-wise MoE balance loss of its last forward (0 when switched off)."""
    terms = [m.aux_loss for m in model.moe_layers() if m.aux_loss is not None]
    return sum(terms) if terms else 0.0


class ForwardKLObjective:
    """fkl: batches (inputs, targets) [B, T] with targets -100 off the answer tokens (SFT's rows).
    One teacher forward per batch; the loss is taken on the answer positions only."""

    def __init__(self, teacher, vocab_size: int, temperature: float = 1.0, ce_weight: float = 0.0):
        self.teacher, self.vocab_size = teacher, vocab_size
        self.temperature, self.ce_weight = temperature, ce_weight

    def __call__(self, model, batch):
        inputs, targets = batch
        mask = targets != IGNORE_INDEX
        teacher_logits = self.teacher.logits(inputs)
        student_logits = model(inputs)
        V = self.vocab_size
        s, t = student_logits[mask][:, :V], teacher_logits[mask][:, :V]  # [M, V]: the answer positions
        if s.shape[0] == 0:
            zero = student_logits.sum() * 0.0
            return zero, {"kl": zero.detach(), "ce": zero.detach()}
        kl = forward_kl(s, t, self.temperature).mean()
        ce = F.cross_entropy(s.float(), targets[mask])
        loss = (1 - self.ce_weight) * kl + self.ce_weight * ce + balance_loss(model)
        return loss, {"kl": kl.detach(), "ce": ce.detach()}


class ReverseKLObjective:
    """rkl: batches {"input_ids" [B, L], "mask" [B, L-1]} of prompts + the student's own answers, mask 1
    where position t predicts an answer token. One teacher forward per batch."""

    def __init__(self, teacher, vocab_size: int, estimator: str = "full"):
        self.teacher, self.vocab_size, self.estimator = teacher, vocab_size, estimator

    def __call__(self, model, batch):
        ids, mask = batch["input_ids"], batch["mask"].bool()
        inputs = ids[:, :-1]
        teacher_logits = self.teacher.logits(inputs)
        student_logits = model(inputs)
        V = self.vocab_size
        s, t = student_logits[mask][:, :V], teacher_logits[mask][:, :V]  # [M, V]
        tokens = ids[:, 1:][mask, None]  # [M, 1]: the sampled tokens
        sampled_s = F.log_softmax(s.float(), -1).gather(-1, tokens)[:, 0]  # [M]
        sampled_t = F.log_softmax(t.float(), -1).gather(-1, tokens)[:, 0]
        full = reverse_kl(s, t)  # [M]: the exact per-position KL, also reported with the sampled estimator
        loss = full.mean() if self.estimator == "full" else reverse_kl_policy_gradient(sampled_s, sampled_t).mean()
        stats = {"rkl": full.mean().detach(), "rkl_sampled": (sampled_s - sampled_t).mean().detach(),
                 "teacher_logprob": sampled_t.mean().detach(), "answer_tokens": mask.sum(1).float().mean()}
        for key in ("stopped", "correct"):
            if key in batch:
                stats[f"sample_{key}"] = batch[key].float().mean()
        return loss + balance_loss(model), stats
