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
(a rollout every `epochs x P x G / train.batch_size` optimizer steps, then one minibatch of
train.batch_size samples per step) and `GRPOObjective` its objective. Per step, metrics.jsonl gets
reward_mean, accuracy, zero_variance_frac, clip_frac, entropy, mean_length, kl (to the reference,
when beta > 0), kl_rollout (to the rollout policy), rollout_s and update_s; held-out greedy
evaluations are added as {"step", "eval_accuracy", ...} lines.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from daulat.errors import DaulatError

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


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_tokens: int | None = None,
              denominator: float | None = None) -> torch.Tensor:
    """per_token [N, T] losses, mask [N, T] (1 on the completion tokens that count) -> scalar.

    token:    sum over all tokens / number of tokens (DAPO; long answers weigh by their length)
    sequence: mean over each sequence's tokens, then mean over sequences (original GRPO)
    constant: sum over all tokens / (N x max_tokens) (Dr. GRPO; no length bias either way)
    A sequence with no counted token contributes nothing (and an all-masked batch gives 0).
    `denominator` replaces the count (tokens, sequences, or N x max_tokens) when this batch is one
    micro-batch of a larger optimizer step that is normalised as a whole.
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if how == "token":
        count = mask.sum().clamp_min(1.0) if denominator is None else denominator
        return masked.sum() / count
    if how == "sequence":
        lengths = mask.sum(dim=1)
        per_sequence = masked.sum(dim=1) / lengths.clamp_min(1.0)
        count = (lengths > 0).sum().clamp_min(1) if denominator is None else denominator
        return per_sequence.sum() / count
    if how == "constant":
        if denominator is None:
            if not max_tokens or max_tokens <= 0:
                raise ValueError("the constant aggregation needs max_tokens > 0")
            denominator = per_token.shape[0] * max_tokens
        return masked.sum() / denominator
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


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------------
# Config and rewards
# ------------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    """The [grpo] section. Optimisation (lr, steps, batch size = sequences per optimizer step) is [train]."""

    task: str | None = None  # a built-in task or a .jsonl task (or give --task)
    difficulty: int | None = None  # the task's difficulty knob (default: the task's own)
    system: str | None = None  # a system prompt before every problem
    prompts_per_rollout: int = 16  # P: problems per rollout
    group_size: int = 8  # G: samples per problem, sharing one prefill
    epochs: int = 1  # passes over each rollout batch; steps per rollout = epochs * P * G / train.batch_size
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256  # answer length limit; a sample cut there is "truncated"
    max_prompt_tokens: int = 256  # longest prompt accepted (sizes the engine's cache)
    advantage_std: str = "group"  # divide reward - group mean by the "group" std, the "batch" std, or "none"
    loss_aggregation: str = "token"  # "token" (DAPO), "sequence" (GRPO) or "constant" (Dr. GRPO)
    epsilon_low: float = 0.2  # ratio clipped below at 1 - epsilon_low
    epsilon_high: float = 0.28  # ... and above at 1 + epsilon_high (clip-higher, DAPO)
    beta: float = 0.0  # weight of the k3 KL to the reference (0: no reference is loaded)
    kl_clamp: float = 10.0  # |log pi_ref - log pi| is clamped to this inside k3
    reference: str | None = None  # reference checkpoint for the KL (default: the --init checkpoint)
    zero_variance: str = "drop"  # groups whose rewards are all equal: "drop", "resample" (draw new problems), "keep"
    resample_rounds: int = 3  # at most this many extra generation rounds per rollout when resampling
    mask_truncated: bool = True  # samples cut at max_tokens count in their group but give no gradient
    overlong_buffer: int = 0  # soft overlong penalty over the last this many tokens before max_tokens (0: off)
    overlong_penalty: float = 1.0  # the penalty at max_tokens
    format_reward: float = 0.1  # reward of a wrong answer that still ends in an `Answer:` line (default reward)
    reward: str | None = None  # a custom reward "package.module:function" (completion, example, task) -> float
    eval_every: int = 0  # steps between greedy evaluations on the held-out split (0: at the start and end only)
    eval_problems: int = 100  # held-out problems per evaluation (0: none)

    def __post_init__(self):
        def need(ok, name, why):
            if not ok:
                raise ValueError(f"config field {name!r} = {getattr(self, name)!r}: {why}")

        for name in ("prompts_per_rollout", "group_size", "epochs", "max_tokens", "max_prompt_tokens"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("resample_rounds", "overlong_buffer", "eval_every", "eval_problems", "top_k", "beta",
                     "epsilon_low", "epsilon_high", "format_reward", "overlong_penalty"):
            need(getattr(self, name) >= 0, name, "must not be negative")
        need(self.group_size >= 2, "group_size", "must be at least 2 (advantages are relative to the group)")
        need(self.temperature > 0, "temperature", "must be positive (rollouts sample)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.epsilon_low < 1, "epsilon_low", "must be below 1")
        need(self.kl_clamp > 0, "kl_clamp", "must be positive")
        need(self.overlong_buffer < self.max_tokens, "overlong_buffer", "must be below max_tokens")
        need(self.advantage_std in ADVANTAGE_SCALES, "advantage_std", f"must be one of {', '.join(ADVANTAGE_SCALES)}")
        need(self.loss_aggregation in AGGREGATIONS, "loss_aggregation", f"must be one of {', '.join(AGGREGATIONS)}")
        need(self.zero_variance in ZERO_VARIANCE, "zero_variance", f"must be one of {', '.join(ZERO_VARIANCE)}")


def task_reward(completion: str, example, task, format_weight: float = 0.1) -> float:
    """The default reward: 1 if the task's checker accepts the final answer; `format_weight` if the
    answer is wrong but the completion still ends in a readable `Answer:` line; 0 otherwise."""
    from daulat.data.tasks import extract_answer

    if task.check(completion, example):
        return 1.0
    return format_weight if extract_answer(completion) is not None else 0.0


def load_reward(spec: str | None, format_weight: float) -> Callable:
    """The reward function: `reward(completion_text, example, task) -> float`.

    spec None: `task_reward` with the given format weight; "package.module:function": that function
    (importable from the current directory too), called the same way.
    """
    if not spec:
        return functools.partial(task_reward, format_weight=format_weight)
    import importlib
    import sys

    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise DaulatError(f"config grpo.reward = {spec!r}: expected 'package.module:function'")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise DaulatError(f"config grpo.reward = {spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise DaulatError(f"config grpo.reward = {spec!r}: not a function")
    return fn


# ------------------------------------------------------------------------------------------------
# Rollouts: the batch source
# ------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One completion of a rollout, ready for the update."""

    ids: list[int]  # prompt + completion tokens
    prompt_len: int
    advantage: float
    trained: bool  # False: the sample's tokens give no gradient (truncated, masked)
    engine_logprobs: list[float]  # the engine's log-probs of the completion tokens (for diagnostics)


class RolloutSource:
    """The GRPO batch source: a rollout every `micro_per_rollout` micro-batches, then its micro-batches.

    A rollout samples P problems x G answers with the engine, scores them, computes advantages, drops
    (or replaces) zero-variance groups, and cuts the samples into epochs x steps_per_epoch optimizer
    steps of train.grad_accum micro-batches each. Before any of its updates it records, with the
    training model in the loop's own numeric path, the old policy's log-probs (when there is more than
    one step per rollout; otherwise the update's own detached log-probs are the old ones) and the
    reference's (when beta > 0).

    State for resume: (rollout index, micro-batches handed out). Rollout k is drawn from seeds
    (seed, rank, k) alone, so resuming at a rollout boundary continues exactly; resuming mid-rollout
    regenerates that rollout with the checkpoint's weights.
    """

    def __init__(self, model, tokenizer, task, cfg: GRPOConfig, train_cfg, reward_fn, out=None,
                 reference=None, rank: int = 0, world_size: int = 1, say=print):
        self.model, self.tokenizer, self.task, self.cfg = model, tokenizer, task, cfg
        self.reward_fn, self.reference, self.out, self.say = reward_fn, reference, out, say
        self.seed, self.rank, self.world_size = train_cfg.seed, rank, world_size
        self.grad_accum = train_cfg.grad_accum
        per_rank = train_cfg.batch_size // world_size  # sequences per optimizer step on this rank
        rollout = cfg.prompts_per_rollout * cfg.group_size
        if train_cfg.batch_size % world_size or rollout % per_rank or per_rank % train_cfg.grad_accum:
            raise DaulatError(
                f"a rollout of grpo.prompts_per_rollout x grpo.group_size = {rollout} samples must split into whole "
                f"optimizer steps of train.batch_size = {train_cfg.batch_size} sequences ({world_size} rank(s), "
                f"train.grad_accum = {train_cfg.grad_accum} micro-batches each)")
        self.per_step = per_rank
        self.steps_per_epoch = rollout // per_rank
        self.steps_per_rollout = cfg.epochs * self.steps_per_epoch
        self.micro_per_rollout = self.steps_per_rollout * self.grad_accum
        self.rollout_index, self.cursor = 0, 0
        self.buffer: list[dict] | None = None
        self.engine = None
        self.compute_dtype, self.device = torch.float32, torch.device("cpu")
        self._handed_out: float | None = None
        self.last_eval: dict | None = None

    def attach(self, trainer) -> None:
        """Follow the trainer's model, device and compute dtype (call after building the Trainer)."""
        self.model, self.device, self.compute_dtype = trainer.model, trainer.device, trainer.compute_dtype
        if self.reference is not None:
            self.reference.to(self.device)

    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    # -- the iterator the loop pulls from -----------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        update_s = time.perf_counter() - self._handed_out if self._handed_out is not None else 0.0
        if self.cursor >= self.micro_per_rollout:
            self.rollout_index, self.cursor, self.buffer = self.rollout_index + 1, 0, None
        if self.buffer is None:
            self.buffer = self._rollout()
        batch = dict(self.buffer[self.cursor])
        batch["rollout_stats"] = dict(batch["rollout_stats"], update_s=update_s * self.grad_accum)
        self.cursor += 1
        self._handed_out = time.perf_counter()
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rollout": self.rollout_index, "cursor": self.cursor,
                "micro_per_rollout": self.micro_per_rollout}

    def load_state_dict(self, state: dict) -> None:
        if state.get("micro_per_rollout") != self.micro_per_rollout:
            raise DaulatError(f"cannot resume the rollouts: saved with {state.get('micro_per_rollout')} micro-batches "
                              f"per rollout, now {self.micro_per_rollout} (did grpo.* or train.batch_size change?)")
        self.seed, self.rollout_index, self.cursor = int(state["seed"]), int(state["rollout"]), int(state["cursor"])
        self.buffer, self._handed_out = None, None

    # -- generation ---------------------------------------------------------------------------------
    def _engine(self):
        if self.engine is None:
            from daulat.infer import Engine

            cfg = self.cfg
            self.engine = Engine(self.model, self.tokenizer,
                                 max_num_seqs=max(cfg.group_size, min(cfg.prompts_per_rollout * cfg.group_size, 512)),
                                 max_model_len=min(self.model.config.max_position_embeddings,
                                                   cfg.max_prompt_tokens + cfg.max_tokens))
        return self.engine

    def generate_groups(self, examples: list, rng: random.Random) -> list[dict]:
        """G samples for each problem, scored: [{example, prompt, completions, rewards, correct}]."""
        from daulat.eval import chat_prompt
        from daulat.infer import SamplingParams

        cfg = self.cfg
        prompts = [chat_prompt(self.tokenizer, e.prompt, cfg.system) for e in examples]
        for p, e in zip(prompts, examples):
            if len(p) > cfg.max_prompt_tokens:
                raise DaulatError(f"a {self.task.name} prompt has {len(p)} tokens, more than grpo.max_prompt_tokens = "
                                  f"{cfg.max_prompt_tokens}: {e.prompt[:60]!r}")
        params = [SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                 max_tokens=cfg.max_tokens, seed=rng.getrandbits(62)) for _ in prompts]
        results = self._engine().generate(prompts, params)
        groups = []
        for example, prompt, result in zip(examples, prompts, results):
            completions = result.samples
            rewards = [float(self.reward_fn(c.text, example, self.task)) for c in completions]
            lengths = torch.tensor([len(c.token_ids) for c in completions])
            rewards_t = torch.tensor(rewards) + overlong_penalty(lengths, cfg.max_tokens, cfg.overlong_buffer,
                                                                 cfg.overlong_penalty)
            groups.append({"example": example, "prompt": prompt, "completions": completions, "rewards": rewards_t,
                           "correct": [self.task.check(c.text, example) for c in completions]})
        return groups

    @torch.no_grad()
    def _rollout(self) -> list[dict]:
        cfg, model = self.cfg, self.model
        step = self.rollout_index * self.steps_per_rollout
        self._maybe_evaluate(step)
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            rng = random.Random(f"grpo:{self.seed}:{self.rank}:{self.rollout_index}")
            groups = self.generate_groups([self.task.sample(rng, cfg.difficulty) for _ in range(cfg.prompts_per_rollout)], rng)
            first = groups
            kept = groups if cfg.zero_variance == "keep" else [g for g in groups if _has_variance(g)]
            rounds = 0
            while cfg.zero_variance == "resample" and len(kept) < cfg.prompts_per_rollout and rounds < cfg.resample_rounds:
                rounds += 1
                more = self.generate_groups([self.task.sample(rng, cfg.difficulty)
                                             for _ in range(cfg.prompts_per_rollout - len(kept))], rng)
                kept += [g for g in more if _has_variance(g)]
            generated_s = time.perf_counter() - start
            samples = self._samples(kept)
            micro_batches = self._micro_batches(samples, rng)
        finally:
            model.train(was_training)
        rollout_s = time.perf_counter() - start
        completions = [c for g in first for c in g["completions"]]
        stats = {
            "reward_mean": float(torch.cat([g["rewards"] for g in first]).mean()),
            "accuracy": sum(sum(g["correct"]) for g in first) / len(completions),
            "zero_variance_frac": sum(not _has_variance(g) for g in first) / len(first),
            "mean_length": sum(len(c.token_ids) for c in completions) / len(completions),
            "truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "groups_used": float(len(kept)),
            "resample_rounds": float(rounds),
            "rollout_s": rollout_s / self.steps_per_rollout,
            "generate_s": generated_s / self.steps_per_rollout,
        }
        for micro in micro_batches:
            micro["rollout_stats"] = stats
        return micro_batches

    def _samples(self, groups: list[dict]) -> list[Sample]:
        if not groups:
            return []
        cfg = self.cfg
        rewards = torch.stack([g["rewards"] for g in groups])  # [P', G]
        advantages = group_advantages(rewards, cfg.advantage_std)
        samples = []
        for g, adv in zip(groups, advantages.tolist()):
            for c, a in zip(g["completions"], adv):
                if not c.token_ids:
                    continue
                trained = not (cfg.mask_truncated and c.finish_reason == "length")
                samples.append(Sample(g["prompt"] + list(c.token_ids), len(g["prompt"]), a, trained, list(c.logprobs)))
        return samples

    def _micro_batches(self, samples: list[Sample], rng: random.Random) -> list[dict]:
        """epochs x steps_per_epoch optimizer steps x grad_accum micro-batches; each epoch shuffles the
        samples and spreads them evenly over its steps (fewer than nominal when groups were dropped)."""
        micro = []
        for _ in range(self.cfg.epochs):
            order = list(samples)
            rng.shuffle(order)
            for step_samples in _split(order, self.steps_per_epoch):
                parts = _split(step_samples, self.grad_accum)
                denominator = self._denominator(step_samples)
                micro += [self._tensors(part, denominator) for part in parts]
        return micro

    def _denominator(self, step_samples: list[Sample]) -> float:
        """What the loss of one optimizer step is divided by (spread over its micro-batches: the loop
        divides each micro-batch's loss by grad_accum, so each gets denominator / grad_accum)."""
        how = self.cfg.loss_aggregation
        if how == "token":
            count = sum(len(s.ids) - s.prompt_len for s in step_samples if s.trained)
        elif how == "sequence":
            count = sum(1 for s in step_samples if s.trained and len(s.ids) > s.prompt_len)
        else:
            count = self.per_step * self.cfg.max_tokens
        return max(count, 1) / self.grad_accum

    def _tensors(self, samples: list[Sample], denominator: float) -> dict:
        pad = self.tokenizer.pad_id
        if not samples:  # no signal left for this micro-batch: one masked row keeps the step well defined
            return {"input_ids": torch.full((1, 2), pad, dtype=torch.long), "mask": torch.zeros(1, 1),
                    "advantages": torch.zeros(1), "engine_logprobs": torch.zeros(1, 1),
                    "denominator": float(denominator), "n_tokens": 0,
                    **({"old_logprobs": torch.zeros(1, 1)} if self.steps_per_rollout > 1 else {}),
                    **({"ref_logprobs": torch.zeros(1, 1)} if self.reference is not None else {})}
        T = max(len(s.ids) for s in samples)
        ids = torch.full((len(samples), T), pad, dtype=torch.long)
        mask = torch.zeros(len(samples), T - 1)
        engine_lp = torch.zeros(len(samples), T - 1)
        for i, s in enumerate(samples):
            n = len(s.ids) - s.prompt_len
            ids[i, : len(s.ids)] = torch.tensor(s.ids)
            # position t predicts token t + 1: the completion's tokens are predicted at prompt_len - 1 ...
            engine_lp[i, s.prompt_len - 1 : s.prompt_len - 1 + n] = torch.tensor(s.engine_logprobs)
            if s.trained:
                mask[i, s.prompt_len - 1 : s.prompt_len - 1 + n] = 1.0
        batch = {"input_ids": ids, "mask": mask, "advantages": torch.tensor([s.advantage for s in samples]),
                 "engine_logprobs": engine_lp, "denominator": float(denominator),
                 "n_tokens": sum(len(s.ids) for s in samples)}
        on_device = ids.to(self.device)
        with self._autocast():
            if self.steps_per_rollout > 1:  # the old policy, before any update of this rollout
                batch["old_logprobs"] = completion_logprobs(self.model, on_device)[0].cpu()
            if self.reference is not None:
                batch["ref_logprobs"] = completion_logprobs(self.reference, on_device)[0].cpu()
        return batch

    # -- held-out evaluation --------------------------------------------------------------------------
    def _maybe_evaluate(self, step: int) -> None:
        every = self.cfg.eval_every
        due = step == 0 or (every and step // every > (step - self.steps_per_rollout) // every)
        if due and self.cfg.eval_problems and self.rank == 0:
            self.evaluate(step)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Greedy accuracy on the held-out split; appended to OUT/metrics.jsonl as {"step", "eval_accuracy", ...}."""
        from daulat.eval import evaluate_task

        was_training = self.model.training
        self.model.eval()
        try:
            result = evaluate_task(self.model, self.tokenizer, self.task, n=self.cfg.eval_problems,
                                   max_tokens=self.cfg.max_tokens, difficulty=self.cfg.difficulty,
                                   system=self.cfg.system, engine=self._engine())
        finally:
            self.model.train(was_training)
        record = {"step": step, "eval_accuracy": result["accuracy"], "eval_mean_answer_tokens": result["mean_answer_tokens"],
                  "eval_truncated": result["truncated"], "eval_problems": result["problems"], "eval_s": result["seconds"]}
        self.last_eval = record
        if self.out is not None:
            with open(Path(self.out) / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.say(f"step {step}: held-out greedy accuracy {result['accuracy']:.3f} on {result['problems']} problems "
                 f"({result['mean_answer_tokens']:.1f} tokens per answer)")
        return record


def _has_variance(group: dict) -> bool:
    rewards = group["rewards"]
    return bool(rewards.max() - rewards.min() > 1e-6)


def _split(items: list, parts: int) -> list[list]:
    """`items` in `parts` contiguous chunks whose sizes differ by at most one (some empty if too few)."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


# ------------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------------


class GRPOObjective:
    """`objective(model, batch) -> (loss, stats)` for the loop: the clipped surrogate (+ beta k3)."""

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg

    def __call__(self, model, batch: dict):
        cfg = self.cfg
        ids, mask, advantages = batch["input_ids"], batch["mask"], batch["advantages"]
        logprobs, entropy = completion_logprobs(model, ids, with_entropy=True)
        old = batch.get("old_logprobs")
        old = logprobs.detach() if old is None else old  # one step per rollout: on-policy, ratio exactly 1
        per_token, ratio, clipped = clipped_surrogate(logprobs, old, advantages, cfg.epsilon_low, cfg.epsilon_high)
        stats = {}
        if cfg.beta > 0:
            kl = k3_kl(logprobs, batch["ref_logprobs"], cfg.kl_clamp)
            per_token = per_token + cfg.beta * kl
            stats["kl"] = masked_mean(kl.detach(), mask)
        loss = aggregate(per_token, mask, cfg.loss_aggregation, cfg.max_tokens, denominator=batch["denominator"])
        balance = [m.aux_loss for m in model.moe_layers() if m.aux_loss is not None]
        if balance:
            loss = loss + torch.stack(balance).sum()
        with torch.no_grad():
            lp = logprobs.detach()
            stats.update(
                clip_frac=masked_mean(clipped.float(), mask),
                entropy=masked_mean(entropy, mask),
                kl_rollout=masked_mean(k3_kl(lp, old, cfg.kl_clamp), mask),
                ratio_max=(ratio.detach() * mask).max() if mask.any() else torch.ones(()),
                engine_logprob_gap=masked_mean((lp - batch["engine_logprobs"]).abs(), mask),
            )
        stats.update(batch["rollout_stats"])
        return loss, stats


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

# Used when no recipe says otherwise: small, constant steps (RL on a fine-tuned model).
TRAIN_DEFAULTS = {"steps": 200, "batch_size": 128, "lr": 1e-5, "warmup_steps": 0, "schedule": "constant",
                  "weight_decay": 0.0, "log_every": 1, "eval_every": 0, "eval_batches": 0, "grad_clip": 1.0}


def schema() -> dict[str, type]:
    from daulat.train.loop import TrainConfig

    return {"train": TrainConfig, "grpo": GRPOConfig}


def add_arguments(parser) -> None:
    from daulat.train.common import add_common_arguments

    parser.add_argument("--init", required=True, metavar="CKPT", help="checkpoint to train (e.g. runs/sft/final)")
    parser.add_argument("--task", metavar="NAME", help="a built-in task (see `daulat tasks`), a .jsonl task file, or module:name "
                        "(a Python module that registers the task)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints and metrics")
    add_common_arguments(parser, default_preset="tiny")


def run(args) -> int:
    from daulat.train.sft import stage_config

    config = stage_config(schema(), args, "grpo", TRAIN_DEFAULTS)
    if args.task:
        config["grpo"].task = args.task
    if args.print_config:
        from daulat.config import to_toml

        print(to_toml(config), end="")
        return 0
    grpo(config, args.init, args.out, resume=args.resume)
    return 0


def grpo(config: dict, init, out, resume: bool = False, verbose: bool = True) -> dict:
    """Train the checkpoint `init` with GRPO on config["grpo"].task; returns the loop's summary with the
    first and last held-out evaluations."""
    from daulat.checkpoint import load_info, load_model
    from daulat.config import to_dict
    from daulat.eval import load_task
    from daulat.tokenizer import load_tokenizer
    from daulat.train.common import prepare_output
    from daulat.train.loop import Trainer, init_distributed, latest_checkpoint, run_on_main

    train_cfg, cfg = config["train"], config["grpo"]
    d = init_distributed(train_cfg.device)
    say = print if (verbose and d.is_main) else (lambda *a, **k: None)

    # Check every input before writing anything.
    if d.distributed:
        raise DaulatError("GRPO runs in one process for now: the rollout engine needs the whole (unsharded) model; "
                          "run `daulat grpo` without torchrun")
    if not cfg.task:
        raise DaulatError("no task: give --task NAME (see `daulat tasks`) or set grpo.task")
    task = load_task(cfg.task)
    task.sample(random.Random(0), cfg.difficulty)  # a bad difficulty fails here, not mid-run
    reward_fn = load_reward(cfg.reward, cfg.format_reward)
    tokenizer = load_tokenizer(init)
    model = load_model(init)
    if cfg.max_prompt_tokens + cfg.max_tokens > model.config.max_position_embeddings:
        raise DaulatError(f"grpo.max_prompt_tokens + grpo.max_tokens = {cfg.max_prompt_tokens + cfg.max_tokens} exceeds "
                          f"the model's max_position_embeddings ({model.config.max_position_embeddings})")
    reference = None
    if cfg.beta > 0:  # the frozen reference exists only when the KL term is on
        reference = load_model(cfg.reference or init).requires_grad_(False)
        if reference.config.vocab_size != model.config.vocab_size:
            raise DaulatError(f"reference {cfg.reference} has vocab_size {reference.config.vocab_size}, the policy "
                              f"{model.config.vocab_size}")
    source = RolloutSource(model, tokenizer, task, cfg, train_cfg, reward_fn, out=out, reference=reference,
                           rank=d.rank, world_size=d.world_size, say=say)

    out = Path(run_on_main(d, lambda: prepare_output(out, resume)) or out)
    resume_from = latest_checkpoint(out) if resume else None
    if resume and resume_from is None:
        say(f"no checkpoint in {out} yet: starting from the beginning")

    parent = load_info(init)
    info = {"stage": "grpo", "method": "GRPO (group-relative policy optimisation with verifiable rewards)",
            "init": str(init), "config": to_dict(config),
            "data": {"task": task.name, "difficulty": task._difficulty(cfg.difficulty),
                     "generator": f"daulat.data.tasks:{task.name}", "split": "train (the held-out split is only evaluated)",
                     "reward": cfg.reward or f"task checker + format reward {cfg.format_reward}"},
            "tokenizer_sha256": tokenizer.sha256,
            "history": list(parent.get("history", [])) + ([{k: v for k, v in parent.items() if k != "history"}] if parent else [])}
    say(f"GRPO on {task.name}: {cfg.prompts_per_rollout} problems x {cfg.group_size} samples per rollout, "
        f"{source.steps_per_rollout} optimizer step(s) of {train_cfg.batch_size} sequences per rollout, "
        f"{cfg.loss_aggregation} aggregation, eps {cfg.epsilon_low}/{cfg.epsilon_high}, beta {cfg.beta}")
    trainer = Trainer(model, train_cfg, GRPOObjective(cfg), source, out, tokenizer=tokenizer, info=info,
                      resume_from=resume_from, dist=d, batch_tokens=lambda batch: int(batch["n_tokens"]))
    source.attach(trainer)
    if resume_from is not None:
        say(f"resuming from {resume_from} (step {trainer.step})")
    summary = trainer.fit()
    if cfg.eval_problems and d.is_main:
        source.evaluate(trainer.step)
    summary.update(out=str(out), eval=source.last_eval)
    say(f"GRPO: {summary['step']} steps in {summary['wall_time_s']:.0f}s -> {out / 'final'}")
    return summary
