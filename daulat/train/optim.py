"""The [train] config, the learning-rate schedule and the optimizer (AdamW or Muon) with its groups.

    optimizer = build_optimizer(model, config)      # AdamW, or Muon + AdamW (daulat/train/muon.py)
    for group in optimizer.param_groups: group["lr"] = learning_rate(config, step)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig:
    """The [train] section: optimisation, schedule, logging and checkpointing (every stage shares it)."""

    steps: int = 1000  # optimizer steps in the whole run
    batch_size: int = 32  # sequences per optimizer step, over all ranks and micro-batches (the global batch)
    grad_accum: int = 1  # micro-batches per optimizer step; each rank sees batch_size / (ranks * grad_accum) rows
    seq_len: int = 256  # tokens per sequence
    optimizer: str = "adamw"  # "adamw", or "muon" (Muon on weight matrices and experts, AdamW on the rest)
    lr: float = 3e-3  # peak learning rate (Muon matches AdamW's update RMS, so the same rate carries over)
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant" (after warmup)
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps decays linearly
    weight_decay: float = 0.1  # on matrices only: not on norms, biases or the token embedding
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    muon_momentum: float = 0.95  # Muon's momentum (Nesterov)
    qk_clip: float = 0.0  # tau of QK-clip (Kimi K2 uses 100): rescale heads whose max logit exceeds it; 0: off
    log_max_logit: bool = False  # log the largest attention logit per step (always on with qk_clip)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    bias_update_speed: float = 1e-3  # gamma of aux-loss-free balancing (older checkpoints' config.json key is ignored)
    # DeepSeek-V3.2's lightning indexer trains with the model in pretraining and SFT (not under LoRA):
    # the first this many steps train only the indexer, toward the dense attention's distribution (its
    # warm-up), then sparse training, the indexer still learning by KL with its input detached (0:
    # sparse from the start, as from scratch)
    indexer_warmup_steps: int = 0
    log_every: int = 10  # steps between metrics lines
    eval_every: int = 100  # steps between validations (0: only at the end)
    eval_batches: int = 20  # validation batches of batch_size sequences each (0: no validation)
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # step checkpoints kept (0: all)
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if present, else cpu), "cpu", "cuda", ...
    dtype: str = "auto"  # compute dtype: "auto" (bfloat16 autocast on GPU, float32 on CPU), "float32", "bfloat16"
    threads: int | str = "auto"  # torch CPU threads at the start: a number, or "auto" (see daulat.threads)
    compile: bool = False  # torch.compile each block (GPU; needs a working compiler toolchain)
    tensorboard: bool = False  # also write OUT/tensorboard/ (if the tensorboard package is installed)

    def __post_init__(self):
        torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
        problems = [(name, "must be at least 1") for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every")
                    if getattr(self, name) < 1]
        problems += [(name, "must not be negative") for name in ("warmup_steps", "eval_every", "eval_batches", "save_every",
                                                                 "keep_last", "grad_clip", "weight_decay", "qk_clip",
                                                                 "indexer_warmup_steps")
                     if getattr(self, name) < 0]
        problems += [(name, why) for ok, name, why in (
            (self.lr > 0, "lr", "must be positive"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be between 0 and 1"),
            (0 <= self.decay_fraction <= 1, "decay_fraction", "must be between 0 and 1"),
            (0 <= self.muon_momentum < 1, "muon_momentum", "must be in [0, 1)"),
            (self.schedule in ("cosine", "wsd", "constant"), "schedule", "must be 'cosine', 'wsd' or 'constant'"),
            (self.optimizer in OPTIMIZERS, "optimizer", "must be 'adamw' or 'muon'"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype", "must be 'auto', 'float32' or 'bfloat16'"),
            (self.threads == "auto" or (type(self.threads) is int and self.threads >= 1), "threads",
             "must be a whole number of at least 1, or 'auto'"),
            (self.grad_accum < 1 or self.batch_size % self.grad_accum == 0, "batch_size", f"must be divisible by grad_accum ({self.grad_accum})"),
            # Newton-Schulz needs whole matrices and QK-clip whole heads' logits; FSDP2 holds shards
            (not (torchrun and self.optimizer == "muon"), "optimizer", "Muon runs in one process for now: run without torchrun"),
            (not (torchrun and self.tracks_max_logit), "qk_clip",
             "QK-clip and max-logit tracking run in one process for now: run without torchrun"),
            (not (torchrun and self.indexer_warmup_steps > 0), "indexer_warmup_steps",
             "the indexer warm-up runs in one process for now: run without torchrun"),
        ) if not ok]
        if problems:
            name, why = problems[0]
            raise ValueError(f"config field {name!r} = {getattr(self, name)!r}: {why}")

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch over all ranks together."""
        return self.batch_size // self.grad_accum

    @property
    def tracks_max_logit(self) -> bool:
        return self.qk_clip > 0 or self.log_max_logit


def indexer_is_trainable(model) -> bool:
    """Whether `model` has a DeepSeek-V3.2 lightning indexer that can learn here (not frozen, as under LoRA)."""
    return hasattr(model, "indexer_mode") and any(p.requires_grad for n, p in model.named_parameters() if ".indexer." in n)


def router_bias_speed(model: torch.nn.Module, config: TrainConfig) -> float:
    """gamma of aux-loss-free balancing for this model: train.bias_update_speed, or 0 for a LoRA model,
    whose whole base (the router's correction bias included) stays frozen."""
    return 0.0 if getattr(model, "lora", None) is not None else config.bias_update_speed


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then cosine or WSD decay."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return peak
    if config.schedule == "wsd":
        decay_steps = max(1, round(config.decay_fraction * config.steps))
        decay_start = max(config.warmup_steps, config.steps - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start + 1) / max(1, config.steps - decay_start))
        return peak + (floor - peak) * progress
    progress = min(1.0, (step - config.warmup_steps + 1) / max(1, config.steps - config.warmup_steps))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def _trained(model: torch.nn.Module):
    """(name, parameter) of each trainable parameter once (a tied head is the embedding)."""
    seen = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield name, p


def _decays(name: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2 and not name.endswith(".bias") and "embed_tokens" not in name


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices (projections, experts, router, lm_head); none on
    norms and biases (1-D, scale/shift parameters that decay would pull to zero for no gain) nor on the
    token embedding (each row is updated only when its token occurs, so decay would shrink rare tokens)."""
    decay, no_decay = [], []
    for name, p in _trained(model):
        (decay if _decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def takes_muon(name: str, p: torch.Tensor) -> bool:
    """Hidden weight matrices and stacked experts; not the token embedding nor the output head (their
    rows are per-token vectors, not a linear map between hidden spaces), not norms or biases."""
    return _decays(name, p) and "lm_head" not in name


def muon_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Muon groups (matrices; gate_up_proj as two row blocks per expert) and AdamW groups (the rest)."""
    matrices, fused, decay, no_decay = [], [], [], []
    for name, p in _trained(model):
        if takes_muon(name, p):
            (fused if name.endswith("gate_up_proj") else matrices).append(p)
        else:
            (decay if _decays(name, p) else no_decay).append(p)
    return [{"params": matrices, "weight_decay": weight_decay, "muon": True},
            {"params": fused, "weight_decay": weight_decay, "muon": True, "split": 2},
            {"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over `parameter_groups`, or Muon + AdamW over `muon_groups` (train.optimizer)."""
    betas = (config.beta1, config.beta2)
    if config.optimizer == "muon":
        from daulat.train.muon import Muon

        return Muon(muon_groups(model, config.weight_decay), lr=config.lr, betas=betas, eps=config.eps,
                    momentum=config.muon_momentum)
    return torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=betas, eps=config.eps)
