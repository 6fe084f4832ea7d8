"""GRPO's batch source: rollouts from the inference engine, scored by a reward, cut into minibatches.

A rollout draws P problems from the task's training split and samples G completions per problem
(one prefill per problem, shared by its G samples). A reward function scores each completion
(`task_reward` by default: the task's checker, plus a small reward for a readable answer line); the
advantages are relative to each group (daulat/train/grpo_math.py). Groups whose rewards are all equal
carry no signal and are dropped (or replaced by new problems); samples cut off at max_tokens are
masked out of the loss.

The old-policy log-probs of the ratio are recomputed with the training model on exactly the tensors
the update will see (not taken from the engine's decode path), so with no update the ratio is exactly
1. The engine's own log-probs are kept to report how far the two paths disagree.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from daulat.errors import DaulatError
from daulat.infer.engine.sequence import FINISH_LENGTH
from daulat.train.grpo_math import completion_logprobs, group_advantages, overlong_penalty, step_denominator


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

    def __init__(self, model, tokenizer, task, cfg, train_cfg, reward_fn, reference=None,
                 rank: int = 0, world_size: int = 1, say=print):
        self.model, self.tokenizer, self.task, self.cfg = model, tokenizer, task, cfg
        self.reward_fn, self.reference, self.say = reward_fn, reference, say
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
        self.engine, self.trainer = None, None
        self.device, self.autocast = torch.device("cpu"), contextlib.nullcontext  # until bound to a Trainer
        self._handed_out: float | None = None
        self.last_eval: dict | None = None

    def bind(self, trainer) -> None:
        """The Trainer's seam: sample with its live model, on its device, in its autocast."""
        self.trainer, self.model, self.device, self.autocast = trainer, trainer.model, trainer.device, trainer.autocast
        self.engine = None  # built over the bound model when first needed
        if self.reference is not None:
            self.reference.to(self.device)

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
            from daulat.generation import make_engine

            cfg = self.cfg
            self.engine = make_engine(self.model, self.tokenizer,
                                      sequences=max(cfg.group_size, min(cfg.prompts_per_rollout * cfg.group_size, 512)),
                                      context=cfg.max_prompt_tokens + cfg.sampling.max_tokens)
        return self.engine

    def generate_groups(self, examples: list, rng: random.Random) -> list[dict]:
        """G samples for each problem, scored: [{example, prompt, completions, rewards, correct}]."""
        from daulat.eval import chat_prompt

        cfg, max_tokens = self.cfg, self.cfg.sampling.max_tokens
        prompts = [chat_prompt(self.tokenizer, e.prompt, cfg.system) for e in examples]
        for p, e in zip(prompts, examples):
            if len(p) > cfg.max_prompt_tokens:
                raise DaulatError(f"a {self.task.name} prompt has {len(p)} tokens, more than grpo.max_prompt_tokens = "
                                  f"{cfg.max_prompt_tokens}: {e.prompt[:60]!r}")
        params = [cfg.sampling.params(n=cfg.group_size, seed=rng.getrandbits(62)) for _ in prompts]
        results = self._engine().generate(prompts, params)
        groups = []
        for example, prompt, result in zip(examples, prompts, results):
            completions = result.samples
            rewards = [float(self.reward_fn(c.text, example, self.task)) for c in completions]
            lengths = torch.tensor([len(c.token_ids) for c in completions])
            rewards_t = torch.tensor(rewards) + overlong_penalty(lengths, max_tokens, cfg.overlong_buffer,
                                                                 cfg.overlong_penalty)
            groups.append({"example": example, "prompt": prompt, "completions": completions, "rewards": rewards_t,
                           "correct": [self.task.check(c.text, example) for c in completions]})
        return groups

    @torch.no_grad()
    def _rollout(self) -> list[dict]:
        cfg, model = self.cfg, self.model
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
            "truncated_frac": sum(c.finish_reason == FINISH_LENGTH for c in completions) / len(completions),
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
                trained = not (cfg.mask_truncated and c.finish_reason == FINISH_LENGTH)
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
        """What each micro-batch's loss of one optimizer step is divided by (see `step_denominator`)."""
        lengths = [len(s.ids) - s.prompt_len if s.trained else 0 for s in step_samples]
        return step_denominator(self.cfg.loss_aggregation, lengths, self.per_step, self.cfg.sampling.max_tokens,
                                self.grad_accum)

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
        temperature = self.cfg.sampling.temperature  # the policy is the distribution the rollouts sampled
        with self.autocast():
            if self.steps_per_rollout > 1:  # the old policy, before any update of this rollout
                batch["old_logprobs"] = completion_logprobs(self.model, on_device, temperature=temperature)[0].cpu()
            if self.reference is not None:
                batch["ref_logprobs"] = completion_logprobs(self.reference, on_device, temperature=temperature)[0].cpu()
        return batch

    # -- held-out evaluation (the Trainer's `evaluate`: it calls this in eval mode, without gradients) --
    def evaluate(self, model) -> dict:
        """Greedy accuracy on the held-out split, with the rollout engine (over the same live model)."""
        from daulat.eval import evaluate_task

        cfg = self.cfg
        result = evaluate_task(model, self.tokenizer, self.task, n=cfg.eval_problems, max_tokens=cfg.sampling.max_tokens,
                               difficulty=cfg.difficulty, system=cfg.system,
                               engine=self._engine() if model is self.model else None)
        record = {"eval_accuracy": result["accuracy"], "eval_mean_answer_tokens": result["mean_answer_tokens"],
                  "eval_truncated": result["truncated"], "eval_problems": result["problems"], "eval_s": result["seconds"]}
        step = self.trainer.step if self.trainer is not None else None
        self.last_eval = {"step": step, **record}
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
