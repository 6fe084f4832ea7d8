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

The policy is the distribution the rollouts are sampled from: softmax(logits / grpo.sampling.temperature)
(top_p and top_k, if set, are not part of it). The old-policy log-probs of the ratio are recomputed with the training model on exactly the tensors
the update will see (not taken from the engine's decode path), so with no update the ratio is
exactly 1. The engine's own log-probs are kept to report how far the two paths disagree.

GRPO runs on the one training loop of daulat/train/loop.py, through the stage skeleton of
daulat/train/stage.py. Its pieces: the math in grpo_math.py; the batch source in rollouts.py
(`RolloutSource`: a rollout every `epochs x P x G / train.batch_size` optimizer steps, then one
minibatch of train.batch_size samples per step); here, its config, its objective (`GRPOObjective`)
and the stage. Per step, metrics.jsonl gets reward_mean, accuracy, zero_variance_frac, clip_frac,
entropy, mean_length, kl (to the reference, when beta > 0), kl_rollout (to the rollout policy),
rollout_s and update_s; the held-out greedy evaluation (at the start, every train.eval_every steps
and at the end) is the Trainer's `evaluate`, written as {"step", "eval_accuracy", ...} lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from daulat.errors import DaulatError
from daulat.generation import Sampling
from daulat.train.grpo_math import (  # noqa: F401 - the math, re-exported for `from daulat.train.grpo import ...`
    ADVANTAGE_SCALES, AGGREGATIONS, aggregate, clipped_surrogate, completion_logprobs, group_advantages, k3_kl,
    masked_mean, overlong_penalty,
)
from daulat.train.rollouts import RolloutSource, load_reward, task_reward  # noqa: F401
from daulat.train.stage import Stage, StageRun, Training, stage_schema

ZERO_VARIANCE = ("drop", "resample", "keep")


@dataclass
class GRPOConfig:
    """The [grpo] section. Optimisation (lr, steps, batch size = sequences per optimizer step) is [train],
    and so is how often the held-out split is evaluated (train.eval_every; 0: at the start and end only)."""

    task: str | None = None  # a built-in task or a .jsonl task (or give --task)
    difficulty: int | None = None  # the task's difficulty knob (default: the task's own)
    system: str | None = None  # a system prompt before every problem
    prompts_per_rollout: int = 16  # P: problems per rollout
    group_size: int = 8  # G: samples per problem, sharing one prefill
    epochs: int = 1  # passes over each rollout batch; steps per rollout = epochs * P * G / train.batch_size
    sampling: Sampling = field(default_factory=Sampling)  # [grpo.sampling]: max_tokens is the answer limit
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
    eval_problems: int = 100  # held-out problems per evaluation (0: none)

    def __post_init__(self):
        def need(ok, name, why):
            if not ok:
                raise ValueError(f"config field {name!r} = {getattr(self, name)!r}: {why}")

        for name in ("prompts_per_rollout", "group_size", "epochs", "max_prompt_tokens"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("resample_rounds", "overlong_buffer", "eval_problems", "beta", "epsilon_low", "epsilon_high",
                     "format_reward", "overlong_penalty"):
            need(getattr(self, name) >= 0, name, "must not be negative")
        need(self.group_size >= 2, "group_size", "must be at least 2 (advantages are relative to the group)")
        need(self.sampling.temperature > 0, "sampling", "sampling.temperature must be positive (rollouts sample)")
        need(self.epsilon_low < 1, "epsilon_low", "must be below 1")
        need(self.kl_clamp > 0, "kl_clamp", "must be positive")
        need(self.overlong_buffer < self.sampling.max_tokens, "overlong_buffer", "must be below sampling.max_tokens")
        need(self.advantage_std in ADVANTAGE_SCALES, "advantage_std", f"must be one of {', '.join(ADVANTAGE_SCALES)}")
        need(self.loss_aggregation in AGGREGATIONS, "loss_aggregation", f"must be one of {', '.join(AGGREGATIONS)}")
        need(self.zero_variance in ZERO_VARIANCE, "zero_variance", f"must be one of {', '.join(ZERO_VARIANCE)}")


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
        logprobs, entropy = completion_logprobs(model, ids, with_entropy=True, temperature=cfg.sampling.temperature)
        old = batch.get("old_logprobs")
        old = logprobs.detach() if old is None else old  # one step per rollout: on-policy, ratio exactly 1
        per_token, ratio, clipped = clipped_surrogate(logprobs, old, advantages, cfg.epsilon_low, cfg.epsilon_high)
        stats = {}
        if cfg.beta > 0:
            kl = k3_kl(logprobs, batch["ref_logprobs"], cfg.kl_clamp)
            per_token = per_token + cfg.beta * kl
            stats["kl"] = masked_mean(kl.detach(), mask)
        loss = aggregate(per_token, mask, cfg.loss_aggregation, cfg.sampling.max_tokens, denominator=batch["denominator"])
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
            )
            if cfg.sampling.temperature == 1.0:  # the engine reports the raw (temperature 1) log-probs
                stats["engine_logprob_gap"] = masked_mean((lp - batch["engine_logprobs"]).abs(), mask)
        stats.update(batch["rollout_stats"])
        return loss, stats


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

# Used when no recipe says otherwise: small, constant steps (RL on a fine-tuned model).
TRAIN_DEFAULTS = {"steps": 200, "batch_size": 128, "lr": 1e-5, "warmup_steps": 0, "schedule": "constant",
                  "weight_decay": 0.0, "log_every": 1, "eval_every": 0, "eval_batches": 0, "grad_clip": 1.0}
METHOD = "GRPO (group-relative policy optimisation with verifiable rewards)"


schema = stage_schema(grpo=GRPOConfig)
STAGE = Stage("grpo", schema, TRAIN_DEFAULTS, lora=True)


def add_arguments(parser) -> None:
    from daulat.train.common import TASK_HELP, add_common_arguments

    parser.add_argument("--init", required=True, metavar="CKPT", help="checkpoint to train (e.g. runs/sft/final)")
    parser.add_argument("--task", metavar="NAME", help=TASK_HELP)
    parser.add_argument("--out", required=True, help="run directory: checkpoints and metrics")
    add_common_arguments(parser, default_preset="tiny", lora=True)


def run(args) -> int:
    from daulat.train.common import run_command

    return run_command(STAGE, args, {"task": "grpo.task"},
                       lambda config: grpo(config, args.init, args.out, resume=args.resume))


def _reference(cfg: GRPOConfig, init, policy):
    """The frozen reference of the KL term (None when beta = 0: it is then never loaded). A LoRA policy
    is its own reference, as it is before training (daulat.lora.FrozenBase): no second copy."""
    from daulat import lora
    from daulat.checkpoint import load_checkpoint

    if cfg.beta <= 0:
        return None
    if lora.is_lora(policy) and cfg.reference is None:
        return lora.FrozenBase(policy)
    reference = load_checkpoint(cfg.reference or init).model.requires_grad_(False)
    if reference.config.vocab_size != policy.config.vocab_size:
        raise DaulatError(f"reference {cfg.reference} has vocab_size {reference.config.vocab_size}, the policy "
                          f"{policy.config.vocab_size}")
    return reference


def grpo(config: dict, init, out, resume: bool = False, verbose: bool = True) -> dict:
    """Train the checkpoint `init` with GRPO on config["grpo"].task; returns the loop's summary with the
    last held-out evaluation (`eval`)."""
    import random

    from daulat.eval import load_task

    train_cfg, cfg = config["train"], config["grpo"]
    run = StageRun(STAGE, config, out, resume=resume, verbose=verbose,
                   single_process="GRPO runs in one process for now: the rollout engine needs the whole (unsharded) "
                                  "model; run `daulat grpo` without torchrun")

    # Check every input before writing anything.
    if not cfg.task:
        raise DaulatError("no task: give --task NAME (see `daulat tasks`) or set grpo.task")
    task = load_task(cfg.task)
    task.sample(random.Random(0), cfg.difficulty)  # a bad difficulty fails here, not mid-run
    reward_fn = load_reward(cfg.reward, cfg.format_reward)
    model, tokenizer, parent = run.load_trainable(init)
    run.check_context(cfg.max_prompt_tokens + cfg.sampling.max_tokens, model.config.max_position_embeddings,
                      what="grpo.max_prompt_tokens + grpo.sampling.max_tokens")
    source = RolloutSource(model, tokenizer, task, cfg, train_cfg, reward_fn, reference=_reference(cfg, init, model),
                           rank=run.dist.rank, world_size=run.dist.world_size, say=run.say)
    run.prepare_output()

    data = {"task": task.name, "difficulty": task._difficulty(cfg.difficulty), "generator": f"daulat.data.tasks:{task.name}",
            "split": "train (the held-out split is only evaluated)",
            "reward": cfg.reward or f"task checker + format reward {cfg.format_reward}"}
    run.say(f"GRPO on {task.name}: {cfg.prompts_per_rollout} problems x {cfg.group_size} samples per rollout, "
            f"{source.steps_per_rollout} optimizer step(s) of {train_cfg.batch_size} sequences per rollout, "
            f"{cfg.loss_aggregation} aggregation, eps {cfg.epsilon_low}/{cfg.epsilon_high}, beta {cfg.beta}")
    summary = run.train(Training(model, GRPOObjective(cfg), source, tokenizer, METHOD, data, parent=parent,
                                 extra={"init": str(init)}, evaluate=source.evaluate if cfg.eval_problems else None,
                                 evaluate_at_start=True, batch_tokens=lambda batch: int(batch["n_tokens"])))
    summary["eval"] = source.last_eval
    return summary
