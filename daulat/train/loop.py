"""The one training loop. Pretraining, SFT, GRPO and distillation are objectives run on it.

    trainer = Trainer(model, TrainConfig(steps=1000), objective, batches, "runs/x",
                      val_batches=lambda: ..., tokenizer=tok, info={"stage": "pretrain", ...})
    summary = trainer.fit()

A stage brings two things:

  * an objective `objective(model, batch) -> (loss, stats)`: a scalar loss to minimise and a dict of
    scalars to log (floats or 0-d tensors; a "ce" entry is what validation reports). Pretraining's is
    `model.training_loss(inputs, targets)`.
  * a batch source: an iterator of batches (tensors, or tuples/lists/dicts of them; moved to the device
    here) with `state_dict()` / `load_state_dict(state)` so that a resumed run sees the batches an
    uninterrupted one would have seen. Under data parallelism each rank's source yields its own disjoint
    share of every global micro-batch (see daulat.data.shards.BatchSampler).

The loop owns everything else: AdamW with weight-decay groups, the learning-rate schedule, gradient
clipping and accumulation, the auxiliary-loss-free router-bias update after every optimizer step,
bf16 autocast (GPU) or float32 (CPU), FSDP2 under torchrun, validation, metrics, progress, and
checkpoints that resume exactly (bitwise on CPU with the same seed and thread count).

On disk, in the output directory:

    metrics.jsonl       one JSON object per logged step (step, loss, lr, tokens, tokens_per_s, ...) and
                        per validation (step, val_loss, ...)
    step-NNNNNN/        checkpoints (DESIGN.md format) with train_state/: optimizer moments, step,
                        RNG states and the batch source's position; the last `keep_last` are kept
    final/              the finished model (no train_state)
    tensorboard/        when `tensorboard = true` and the package is installed
"""

from __future__ import annotations

import atexit
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from daulat.errors import DaulatError

STEP_DIR = re.compile(r"^step-(\d+)$")
METRICS_FILE = "metrics.jsonl"


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The [train] section: optimisation, schedule, logging and checkpointing (every stage shares it)."""

    steps: int = 1000  # optimizer steps in the whole run
    batch_size: int = 32  # sequences per optimizer step, over all ranks and micro-batches (the global batch)
    grad_accum: int = 1  # micro-batches per optimizer step; each rank sees batch_size / (ranks * grad_accum) rows
    seq_len: int = 256  # tokens per sequence
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant" (after warmup)
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps decays linearly
    weight_decay: float = 0.1  # on matrices only: not on norms, biases or the token embedding
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    bias_update_speed: float | None = None  # gamma of aux-loss-free balancing; unset: the model's own
    log_every: int = 10  # steps between metrics lines
    eval_every: int = 100  # steps between validations (0: only at the end)
    eval_batches: int = 20  # validation batches of batch_size sequences each (0: no validation)
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # step checkpoints kept (0: all)
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if present, else cpu), "cpu", "cuda", ...
    dtype: str = "auto"  # compute dtype: "auto" (bfloat16 autocast on GPU, float32 on CPU), "float32", "bfloat16"
    compile: bool = False  # torch.compile each block (GPU; needs a working compiler toolchain)
    tensorboard: bool = False  # also write OUT/tensorboard/ (if the tensorboard package is installed)

    def __post_init__(self):
        def need(ok, name, why):
            if not ok:
                raise ValueError(f"config field {name!r} = {getattr(self, name)!r}: {why}")

        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "keep_last", "grad_clip", "weight_decay"):
            need(getattr(self, name) >= 0, name, "must not be negative")
        need(self.lr > 0, "lr", "must be positive")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be between 0 and 1")
        need(0 <= self.decay_fraction <= 1, "decay_fraction", "must be between 0 and 1")
        need(self.schedule in ("cosine", "wsd", "constant"), "schedule", "must be 'cosine', 'wsd' or 'constant'")
        need(self.dtype in ("auto", "float32", "bfloat16"), "dtype", "must be 'auto', 'float32' or 'bfloat16'")
        need(self.batch_size % self.grad_accum == 0, "batch_size", f"must be divisible by grad_accum ({self.grad_accum})")

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch over all ranks together."""
        return self.batch_size // self.grad_accum


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


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices (projections, experts, router, lm_head); none on
    norms and biases (1-D, scale/shift parameters that decay would pull to zero for no gain) nor on the
    token embedding (each row is updated only when its token occurs, so decay would shrink rare tokens)."""
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or name.endswith(".bias") or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------
# Distribution (the model knows nothing of it)
# ------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """Where this process sits: rank, world size and device. world_size 1 is a plain single process."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DaulatError(f"config train.device = {name!r}: not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DaulatError(f"config train.device = {name!r}: no CUDA device is available")
    return device


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on GPU, gloo on CPU.
    Each rank uses GPU LOCAL_RANK. Without torchrun this is a single process on `device`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    base = resolve_device(device)
    if world_size == 1:
        return Dist(0, 1, base)
    import torch.distributed as dist

    if base.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        base = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if base.type == "cuda" else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return Dist(dist.get_rank(), dist.get_world_size(), base)


def run_on_main(d: Dist, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 while the others wait; a DaulatError there is raised on every rank (no hang)."""
    if not d.distributed:
        return fn()
    result, error = None, None
    if d.is_main:
        try:
            result = fn()
        except DaulatError as e:
            error = str(e)
    box = [error]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise DaulatError(box[0])
    return result


def shard_model(model: torch.nn.Module, d: Dist) -> None:
    """FSDP2: shard each block (and each MTP module), then the root (embedding, final norm, head)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in list(model.layers) + list(getattr(model, "mtp", [])):
        fully_shard(block)
    fully_shard(model)
    # objectives call model.training_loss(...) rather than model(...): its parameters must be gathered too
    register_fsdp_forward_method(model, "training_loss")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter or state, on CPU. Collective under FSDP."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` placed as `ref` is: sharded the same way under FSDP, on the same device and dtype."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(ref.device_mesh.device_type, ref.dtype), ref.device_mesh, ref.placements)
    return full.to(ref.device, ref.dtype)


# ------------------------------------------------------------------------------------------------
# Checkpoints on disk
# ------------------------------------------------------------------------------------------------


def step_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """(step, path) of the complete step checkpoints in `out_dir`, oldest first. Checkpoints are
    renamed into place whole, so a directory named step-N is complete (a save cut short leaves only a
    hidden temporary directory)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m[1]), p) for p in out.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(out_dir) -> Path | None:
    found = step_checkpoints(out_dir)
    return found[-1][1] if found else None


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary directories of saves that a kill cut short (never a complete checkpoint)."""
    for p in out_dir.glob(".*.tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def count_tokens(batch) -> int:
    """Tokens in a batch: the first tensor's elements (inputs of (inputs, targets), or input_ids)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        first = batch.get("input_ids", next(iter(batch.values())))
        return count_tokens(first)
    if isinstance(batch, (tuple, list)):
        return count_tokens(batch[0])
    raise TypeError(f"cannot count the tokens of a {type(batch).__name__} batch; pass batch_tokens=")


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def hardware(d: Dist) -> dict:
    if d.device.type == "cuda":
        name = torch.cuda.get_device_name(d.device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return {"device": name, "device_type": d.device.type, "world_size": d.world_size,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


class Trainer:
    """Owns the model's optimisation: call `fit()`; `evaluate()` and `save(path)` are public too.

    model: a DeepseekV3 on any device (moved to this process's device, sharded under torchrun).
    objective: `objective(model, batch) -> (loss, stats)`.
    batches: iterator of micro-batches with state_dict()/load_state_dict().
    val_batches: a callable returning a fresh iterable of validation batches (None: no validation).
    info: the stage's record for every checkpoint's daulat.json (see daulat.provenance.stage_info: stage,
        method, config, data manifest...); the loop adds step and tokens, fills `compute` (tokens, wall
        time, FLOPs, parameters, hardware, energy estimate) and `metrics` (last train and val loss).
    resume_from: a step checkpoint written by this loop (see `latest_checkpoint`).
    batch_tokens: tokens in a micro-batch, for throughput and FLOPs (default: `count_tokens`).
    """

    def __init__(self, model, config: TrainConfig, objective: Callable, batches: Iterator, out_dir, *,
                 val_batches: Callable[[], Iterable] | None = None, tokenizer=None, info: dict | None = None,
                 resume_from=None, dist: Dist | None = None, batch_tokens: Callable[[Any], int] = count_tokens):
        self.config, self.objective, self.batches = config, objective, batches
        self.val_batches, self.tokenizer, self.batch_tokens = val_batches, tokenizer, batch_tokens
        self.info = dict(info or {})
        self.out = Path(out_dir)
        self.dist = dist or init_distributed(config.device)
        self.device = self.dist.device
        self.compute_dtype = torch.bfloat16 if (config.dtype == "bfloat16" or (config.dtype == "auto" and self.device.type == "cuda")) else torch.float32
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.model_config = model.config
        self.gamma = config.bias_update_speed if config.bias_update_speed is not None else model.config.bias_update_speed
        # FLOPs per token (6 N: forward 2N + backward 4N), N = parameters used per token without the
        # embedding table (a lookup, not a matmul); attention's T^2 term is left out (small at these lengths)
        self.active_params = model.num_parameters(active=True) - (0 if model.config.tie_word_embeddings else model.embed_tokens.weight.numel())
        self.total_params, self.active_params_with_embedding = model.num_parameters(), model.num_parameters(active=True)
        self.step, self.tokens, self.elapsed_before = 0, 0, 0.0
        self.last_loss: float | None = None
        self.last_val_loss: float | None = None

        model.to(self.device)
        if resume_from is not None:
            self._load_weights(Path(resume_from), model)
        self.model = model
        if config.compile:  # per block, before sharding (as torchtitan does): the blocks are the repeated work
            for block in model.layers:
                block.compile()
        if self.dist.distributed:
            shard_model(model, self.dist)
        self.optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                                           betas=(config.beta1, config.beta2), eps=config.eps)
        if resume_from is not None:
            self._load_train_state(Path(resume_from))
        else:
            self._seed_rngs(config.seed)
        model.train()

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until `config.steps`; returns a summary (step, tokens, loss, val_loss, wall_time_s)."""
        cfg, d = self.config, self.dist
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(self.out)
        metrics = _MetricsLog(self.out, self.step, d.is_main, cfg.tensorboard)
        progress = _Progress(cfg.steps, self.step, d.is_main)
        self.session_start = time.time()
        window = _Window(self.tokens)
        last_logged_step = self.step
        loss_sum = torch.zeros((), device=self.device)
        stats_sum: dict[str, torch.Tensor] = {}
        load_sum: list[torch.Tensor] | None = None
        pending_tokens = 0  # this rank's tokens not yet added to self.tokens
        try:
            while self.step < cfg.steps:
                step_start = time.perf_counter()
                lr = learning_rate(cfg, self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_tokens = 0
                for micro in range(cfg.grad_accum):
                    batch = to_device(next(self.batches), self.device)
                    step_tokens += self.batch_tokens(batch)
                    if d.distributed and cfg.grad_accum > 1:  # reduce gradients once, after the last micro-batch
                        self.model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
                    with self._autocast():
                        loss, stats = self.objective(self.model, batch)
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach().float() / cfg.grad_accum
                    for key, value in stats.items():
                        value = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach()
                        stats_sum[key] = stats_sum.get(key, 0) + value / cfg.grad_accum
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                loads = self._update_router_bias()
                load_sum = loads if load_sum is None else [a + b for a, b in zip(load_sum, loads)]
                self.step += 1
                pending_tokens += step_tokens
                window.add(time.perf_counter() - step_start)

                at_end = self.step == cfg.steps
                do_eval = cfg.eval_batches and self.val_batches is not None and (at_end or (cfg.eval_every and self.step % cfg.eval_every == 0))
                do_save = at_end or (cfg.save_every and self.step % cfg.save_every == 0)
                do_log = self.step % cfg.log_every == 0 or at_end
                if do_log or do_eval or do_save:  # count the tokens of all ranks (one collective, not one per step)
                    self.tokens += self._global(pending_tokens)
                    pending_tokens = 0
                if do_log:
                    n = self.step - last_logged_step
                    losses = self._mean_over_ranks(torch.stack([loss_sum, *stats_sum.values()]) / n)
                    self.last_loss = losses[0]
                    record = {"step": self.step, "loss": losses[0], "lr": lr, "tokens": self.tokens,
                              "tokens_per_s": window.rate(self.tokens),
                              "grad_norm": float(_full(grad_norm)) if hasattr(grad_norm, "full_tensor") else grad_norm.item()}
                    record.update(zip(stats_sum, losses[1:]))
                    if load_sum:
                        record.update(_expert_load_metrics(load_sum))
                    record["elapsed_s"] = round(self.elapsed(), 3)
                    metrics.write(record)
                    progress.update(self.step, record)
                    loss_sum.zero_()
                    stats_sum, load_sum, last_logged_step = {}, None, self.step
                    window.restart(self.tokens)
                else:
                    progress.update(self.step, None)

                if do_eval:
                    self.last_val_loss = self.evaluate()
                    metrics.write({"step": self.step, "val_loss": self.last_val_loss, "tokens": self.tokens,
                                   "elapsed_s": round(self.elapsed(), 3)})
                    progress.note(f"step {self.step}: val_loss {self.last_val_loss:.4f}")
                if do_save:
                    self.save(self.out / f"step-{self.step:06d}", train_state=True)
                    self._prune()
            self.save(self.out / "final", train_state=False)
        finally:
            progress.close()
            metrics.close()
        return {"step": self.step, "tokens": self.tokens, "loss": self.last_loss, "val_loss": self.last_val_loss,
                "wall_time_s": self.elapsed(), "flops": self.flops()}

    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _global(self, local_tokens: int) -> int:
        if not self.dist.distributed:
            return local_tokens
        t = torch.tensor([local_tokens], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t)
        return int(t.item())

    def _mean_over_ranks(self, values: torch.Tensor) -> list[float]:
        if self.dist.distributed:
            torch.distributed.all_reduce(values)
            values = values / self.dist.world_size
        return values.tolist()

    def _update_router_bias(self) -> list[torch.Tensor]:
        """Aux-loss-free balancing after each optimizer step, on the load of the whole global batch."""
        moes = self.model.moe_layers()
        if not moes:
            return []
        if self.dist.distributed:  # every rank must nudge its (replicated) bias by the same global load
            counts = torch.stack([m.tokens_per_expert for m in moes])
            torch.distributed.all_reduce(counts)
            for m, c in zip(moes, counts):
                m.tokens_per_expert.copy_(c)
        return self.model.update_router_bias(self.gamma)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over `val_batches()` (the objective's "ce" when it reports one, so that
        MTP or balance terms do not blur the comparison), averaged over ranks."""
        self.model.eval()
        total, n = torch.zeros((), device=self.device), 0
        try:
            for batch in self.val_batches():
                with self._autocast():
                    loss, stats = self.objective(self.model, to_device(batch, self.device))
                total += torch.as_tensor(stats.get("ce", loss), device=self.device).float()
                n += 1
        finally:
            self.model.train()
        if n == 0:
            return float("nan")
        return self._mean_over_ranks((total / n).reshape(1))[0]

    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - getattr(self, "session_start", time.time()))

    def flops(self) -> float:
        """6 * N_active * tokens: N_active counts the parameters used per token, without the embedding table."""
        return 6.0 * self.active_params * self.tokens

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, path, train_state: bool = True) -> None:
        """Write a checkpoint (rank 0 writes; every rank takes part in gathering the shards)."""
        d = self.dist
        weights = {k: _full(v) for k, v in self.model.state_dict().items()} if d.distributed else None
        state = self._train_state() if train_state else None
        if d.is_main:
            from daulat.report import save_documented  # the writer, plus the model card from the record

            model = self.model if not d.distributed else _plain_model(self.model_config, weights)
            save_documented(model, path, tokenizer=self.tokenizer, info=self.record(), train_state=state)
        d.barrier()

    def record(self) -> dict:
        """The checkpoint's daulat.json: the stage's `info` with the run's compute and results filled in
        (the provenance record of daulat/provenance.py that the model card is rendered from)."""
        from daulat.provenance import energy_estimate, training_flops

        wall = round(self.elapsed(), 3)
        info = dict(self.info, step=self.step, tokens=self.tokens)
        info["compute"] = dict(info.get("compute") or {}, tokens=self.tokens, wall_time_s=wall,
                               flops=training_flops(self.model_config, self.tokens, self.config.seq_len, self.active_params),
                               flops_6nd=self.flops(), parameters_total=self.total_params,
                               parameters_active=self.active_params_with_embedding, hardware=hardware(self.dist),
                               energy=energy_estimate(wall, self.device.type, self.dist.world_size, torch.get_num_threads()))
        results = {"step": self.step, "train_loss": self.last_loss, "val_loss": self.last_val_loss}
        info["metrics"] = dict(info.get("metrics") or {}, **{k: v for k, v in results.items() if v is not None})
        return info

    def _train_state(self) -> dict:
        tensors: dict[str, torch.Tensor] = {}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                for key, value in state.items():
                    tensors[f"optimizer.{names[id(p)]}.{key}"] = _full(value) if torch.is_tensor(value) else torch.tensor(value)
        rng = self._rng_state()
        if self.dist.distributed:
            gathered = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        rng_meta = []
        for rank, r in enumerate(gathered):
            tensors[f"rng.torch.rank{rank}"] = r.pop("torch")
            if "cuda" in r:
                tensors[f"rng.cuda.rank{rank}"] = r.pop("cuda")
            tensors[f"rng.numpy.rank{rank}"] = r.pop("numpy_keys")
            rng_meta.append(r)
        meta = {"format": "daulat-train-state", "version": 1, "step": self.step, "tokens": self.tokens,
                "elapsed_s": self.elapsed(), "world_size": self.dist.world_size,
                "batches": self.batches.state_dict() if hasattr(self.batches, "state_dict") else None,
                "rng": rng_meta, "train_config": asdict(self.config),
                "last_loss": self.last_loss, "last_val_loss": self.last_val_loss}
        return {"tensors": tensors, "meta": meta}

    def _rng_state(self) -> dict:
        np_state = np.random.get_state()
        py_state = random.getstate()
        state = {"torch": torch.get_rng_state(),
                 "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
                 "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                 "python": [py_state[0], list(py_state[1]), py_state[2]]}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _seed_rngs(self, seed: int) -> None:
        """Each rank its own stream (sampling in RL differs per rank), all from one seed."""
        seed = seed + 1000003 * self.dist.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _load_weights(self, path: Path, model) -> None:
        from daulat.checkpoint import load_config, load_model

        saved = load_config(path).to_hf_dict()
        ours = model.config.to_hf_dict()
        differ = [k for k in sorted(set(saved) | set(ours)) if k not in ("dtype",) and saved.get(k) != ours.get(k)]
        if differ:
            k = differ[0]
            raise DaulatError(f"cannot resume from {path}: its model.{k} is {saved.get(k)!r}, this run's is {ours.get(k)!r}")
        loaded = load_model(path)
        model.load_state_dict(loaded.state_dict())

    def _load_train_state(self, path: Path) -> None:
        from daulat.checkpoint import load_train_state

        state = load_train_state(path)
        tensors, meta = state["tensors"], state["meta"]
        try:
            self.step, self.tokens = int(meta["step"]), int(meta["tokens"])
            self.elapsed_before = float(meta.get("elapsed_s", 0.0))
            self.last_loss, self.last_val_loss = meta.get("last_loss"), meta.get("last_val_loss")
            params = dict(self.model.named_parameters())
            for name, p in params.items():
                prefix = f"optimizer.{name}."
                entries = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if not entries:
                    continue
                self.optimizer.state[p] = {key: value if key == "step" else _like(value, p) for key, value in entries.items()}
            missing = [n for n in params if f"optimizer.{n}.exp_avg" not in tensors]
            if missing and self.step > 0:
                raise DaulatError(f"{path}/train_state: no optimizer state for parameter {missing[0]!r}")
            rank = self.dist.rank if meta.get("world_size") == self.dist.world_size else None
            if rank is not None:
                torch.set_rng_state(tensors[f"rng.torch.rank{rank}"])
                if self.device.type == "cuda" and f"rng.cuda.rank{rank}" in tensors:
                    torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], self.device)
                r = meta["rng"][rank]
                np.random.set_state((r["numpy"][0], tensors[f"rng.numpy.rank{rank}"].numpy().astype(np.uint32), *r["numpy"][1:]))
                random.setstate((r["python"][0], tuple(r["python"][1]), r["python"][2]))
            else:  # another number of ranks: per-rank streams cannot carry over; reseed from the step
                self._seed_rngs(self.config.seed + self.step)
            if meta.get("batches") is not None and hasattr(self.batches, "load_state_dict"):
                self.batches.load_state_dict(meta["batches"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DaulatError(f"{path}/train_state is incomplete or corrupt ({type(e).__name__}: {e})") from None

    def _prune(self) -> None:
        if not self.dist.is_main or self.config.keep_last == 0:
            return
        for _, path in step_checkpoints(self.out)[: -self.config.keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def _plain_model(config, weights: dict[str, torch.Tensor]):
    """An unsharded CPU DeepseekV3 holding `weights` (for the checkpoint writer)."""
    from daulat.model import DeepseekV3, rope_frequencies

    with torch.device("meta"):
        model = DeepseekV3(config)
    model.load_state_dict(weights, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(config)[0]
    for moe in model.moe_layers():
        moe.tokens_per_expert = torch.zeros(moe.n_experts)
    return model


def _expert_load_metrics(loads: list[torch.Tensor]) -> dict:
    """Per MoE layer: max / mean tokens per expert (1.0 is perfect balance) and each expert's share."""
    ratio, share = [], []
    for load in loads:
        load = load.float().cpu()
        total = load.sum().item()
        ratio.append(round(load.max().item() / load.mean().item(), 4) if total > 0 else None)
        share.append([round(x, 4) for x in (load / total).tolist()] if total > 0 else None)
    return {"expert_load_max_over_mean": ratio, "expert_load": share}


class _Window:
    """Throughput over the training steps since the last log: steps are timed one by one, so the time
    spent validating and saving is not counted."""

    def __init__(self, tokens: int):
        self.restart(tokens)

    def restart(self, tokens: int) -> None:
        self.start_tokens, self.seconds = tokens, 0.0

    def add(self, seconds: float) -> None:
        self.seconds += seconds

    def rate(self, tokens: int) -> float:
        return round((tokens - self.start_tokens) / self.seconds, 1) if self.seconds > 0 else 0.0


class _MetricsLog:
    """OUT/metrics.jsonl (rank 0 only). On resume, lines past the checkpoint's step (logged by the run
    that was killed) are dropped, so the file reads as one uninterrupted run."""

    def __init__(self, out: Path, step: int, active: bool, tensorboard: bool):
        self.file = self.writer = None
        if not active:
            return
        path = out / METRICS_FILE
        kept = []
        if step > 0 and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut short by the kill: nothing after it is trustworthy
        tmp = path.with_name(f".{METRICS_FILE}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)
            except ImportError:
                print("daulat: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
                elif key == "expert_load_max_over_mean":
                    for layer, v in enumerate(value):
                        if v is not None:
                            self.writer.add_scalar(f"expert_load_max_over_mean/{layer}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


class _Progress:
    """A tqdm bar (loss, tokens/s, ETA) on a terminal; plain lines at each log step otherwise."""

    def __init__(self, total: int, initial: int, active: bool):
        self.active, self.total, self.bar = active, total, None
        self.start, self.initial = time.time(), initial
        if active and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, record: dict | None) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if record:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        elif record:
            done = step - self.initial
            eta = (time.time() - self.start) / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                  f"{record['tokens_per_s']:.0f} tok/s  eta {eta:.0f}s", flush=True)

    def note(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
