"""The one training loop. Pretraining, SFT, GRPO and distillation are objectives run on it.

    trainer = Trainer(model, TrainConfig(steps=1000), objective, batches, "runs/x",
                      val_batches=lambda: ..., tokenizer=tok, info={"stage": "pretrain", ...})
    summary = trainer.fit()

A stage brings an objective `objective(model, batch) -> (loss, stats)` (a scalar loss and a dict of
scalars to log; a "ce" entry is what validation reports; pretraining's is `model.training_loss`) and a
batch source: an iterator of batches (tensors, or tuples/lists/dicts of them, moved to the device here)
with `state_dict()` / `load_state_dict(state)`, so that a resumed run sees the batches an uninterrupted
one would have seen. Under data parallelism each rank's source yields its own share of every global
micro-batch (see daulat.data.shards.BatchSampler).

The seam for on-policy stages, whose batches come from the model being trained:

  * `batches.bind(trainer)`, if defined, is called once, after the model is placed, sharded and
    compiled and the optimizer exists, before the first batch; the source then reads `trainer.model`
    (live, possibly FSDP-sharded), `trainer.autocast()`, `trainer.device`, `trainer.dist`, `trainer.step`;
  * `evaluate=fn`: `fn(model) -> dict`, called on the main rank (model in eval mode, no grad, the
    Trainer's autocast) at every validation point and at the end, merged into that validation line;
  * `trainer.log(record)` writes one line to metrics.jsonl (main rank; "step" defaults to trainer.step).

Each concern has its module: optim.py (the [train] config, schedule, AdamW or Muon), muon.py (Muon,
QK-clip), distributed.py (FSDP2 under torchrun), state.py (train state, checkpoints, exact resume:
bitwise on CPU with the same seed and threads), metrics.py (metrics.jsonl, TensorBoard, progress). This
file is the step: gradient accumulation and clipping, the aux-loss-free router-bias update after every
optimizer step, bf16 autocast (GPU) or float32 (CPU), validation and saving. In the output directory:

    metrics.jsonl    one JSON object per logged step (step, loss, lr, tokens, tokens_per_s, ...) and per
                     validation (step, val_loss, evaluate's keys, ...)
    step-NNNNNN/     checkpoints with train_state/ (see state.py); the last `keep_last` are kept
    final/           the finished model (no train_state)
    tensorboard/     when `tensorboard = true` and the package is installed
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from daulat.threads import set_threads
from daulat.train import muon, state
from daulat.train.distributed import (Dist, full_tensor, init_distributed, plain_model, resolve_device,  # noqa: F401
                                      run_on_main, shard_model, to_device)
from daulat.train.metrics import (METRICS_FILE, MetricsLog, Progress, StepSums, Window, count_tokens, parameter_counts,
                                  run_record)
from daulat.train.optim import TrainConfig, build_optimizer, learning_rate, parameter_groups  # noqa: F401
from daulat.train.optim import indexer_is_trainable, router_bias_speed
from daulat.train.state import latest_checkpoint, step_checkpoints  # noqa: F401


class Trainer:
    """Owns the model's optimisation: call `fit()`; `train_step()`, `validate()`, `evaluate()`,
    `log(record)` and `save(path)` are its steps and public too.

    model: a DeepseekV3 on any device (moved to this process's device, sharded under torchrun).
    objective: `objective(model, batch) -> (loss, stats)`.
    batches: iterator of micro-batches with state_dict()/load_state_dict(), optionally bind(trainer).
    val_batches: a callable returning a fresh iterable of validation batches (None: no validation loss).
    evaluate: `evaluate(model) -> dict` of held-out results for each validation line (see the module doc).
    info: the stage's record for every checkpoint's daulat.json (daulat.provenance.stage_info), which
        the loop completes (see metrics.run_record).
    resume_from: a step checkpoint written by this loop (see `latest_checkpoint`).
    batch_tokens: tokens in a micro-batch, for throughput and FLOPs (default: `count_tokens`).
    """

    def __init__(self, model, config: TrainConfig, objective: Callable, batches: Iterator, out_dir, *,
                 val_batches: Callable[[], Iterable] | None = None, tokenizer=None, info: dict | None = None,
                 resume_from=None, dist: Dist | None = None, batch_tokens: Callable[[Any], int] = count_tokens,
                 evaluate: Callable[[Any], dict] | None = None, trains_indexer: bool = False):
        set_threads(config.threads)
        self.config, self.objective, self.batches = config, objective, batches
        self.val_batches, self.tokenizer, self.batch_tokens = val_batches, tokenizer, batch_tokens
        self.evaluate_fn, self.info, self.out = evaluate, dict(info or {}), Path(out_dir)
        self.dist = dist or init_distributed(config.device)
        self.device = self.dist.device
        self.compute_dtype = torch.bfloat16 if (config.dtype == "bfloat16" or (config.dtype == "auto" and self.device.type == "cuda")) else torch.float32
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.model_config = model.config
        self.gamma = router_bias_speed(model, config)
        self.indexer_trains = trains_indexer and indexer_is_trainable(model)  # V3.2, through training_loss
        self.params = parameter_counts(model)
        self.step, self.tokens, self.elapsed_before = 0, 0, 0.0
        self.last_loss = self.last_val_loss = None  # float | None
        self._metrics, self._bound = None, False  # the metrics writer while fit() runs; bind() was called

        model.to(self.device)
        if resume_from is not None:
            state.resume_weights(Path(resume_from), model)
        self.model = model
        if config.compile:  # per block, before sharding (as torchtitan does): the blocks are the repeated work
            for block in model.layers:
                block.compile()
        if self.dist.distributed:
            shard_model(model, self.dist)
        self.optimizer = build_optimizer(model, config)
        if resume_from is not None:
            progress = state.restore(Path(resume_from), model, self.optimizer, batches, self.dist, config.seed)
            self.step, self.tokens, self.elapsed_before = progress["step"], progress["tokens"], progress["elapsed_s"]
            self.last_loss, self.last_val_loss = progress["last_loss"], progress["last_val_loss"]
        else:
            state.seed_rngs(config.seed, self.dist.rank)
        model.train()

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until `config.steps`; returns a summary (step, tokens, loss, val_loss, wall_time_s, flops)."""
        cfg, d = self.config, self.dist
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            state.remove_stale_temporaries(self.out)
        self._metrics = MetricsLog(self.out, self.step, d.is_main, cfg.tensorboard)
        self._progress = Progress(cfg.steps, self.step, d.is_main)
        self.session_start = time.time()
        self._window, self._sums, self._last_logged = Window(self.tokens), StepSums(self.device), self.step
        validates = bool(cfg.eval_batches and self.val_batches is not None) or self.evaluate_fn is not None
        pending_tokens = 0  # this rank's tokens not yet added to self.tokens
        try:
            if hasattr(self.batches, "bind") and not self._bound:  # once, before the first batch
                self.batches.bind(self)
                self._bound = True
            while self.step < cfg.steps:
                pending_tokens += self.train_step()
                at_end = self.step == cfg.steps
                do_eval = validates and (at_end or (cfg.eval_every and self.step % cfg.eval_every == 0))
                do_save = at_end or (cfg.save_every and self.step % cfg.save_every == 0)
                do_log = self.step % cfg.log_every == 0 or at_end
                if do_log or do_eval or do_save:  # count the tokens of all ranks (one collective, not one per step)
                    self.tokens += d.sum(pending_tokens)
                    pending_tokens = 0
                self._progress.update(self.step, self._log_step() if do_log else None)
                if do_eval:
                    self.validate()
                if do_save:
                    self.save(state.step_dir(self.out, self.step), train_state=True)
                    if d.is_main:
                        state.prune_checkpoints(self.out, cfg.keep_last)
            self.save(self.out / "final", train_state=False)
        finally:
            if self.indexer_trains:
                self.model.indexer_mode = None
            self._progress.close()
            self._metrics.close()
            self._metrics = None
        return {"step": self.step, "tokens": self.tokens, "loss": self.last_loss, "val_loss": self.last_val_loss,
                "wall_time_s": self.elapsed(), "flops": self.flops()}

    def train_step(self) -> int:
        """One optimizer step over `grad_accum` micro-batches (then QK-clip and the router-bias update).
        Returns this rank's tokens in it."""
        cfg, d = self.config, self.dist
        start = time.perf_counter()
        self.lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        if cfg.tracks_max_logit:
            muon.track_max_logits(self.model)
        if self.indexer_trains:  # DeepSeek-V3.2's indexer: its warm-up, then sparse training (see TrainConfig)
            self.model.indexer_mode = "warmup" if self.step < cfg.indexer_warmup_steps else "sparse"
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = to_device(next(self.batches), self.device)
            tokens += self.batch_tokens(batch)
            if d.distributed and cfg.grad_accum > 1:  # reduce gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with self.autocast():
                loss, stats = self.objective(self.model, batch)
            (loss / cfg.grad_accum).backward()
            self._sums.add_micro(loss, stats, cfg.grad_accum)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.tracks_max_logit:
            self._clip_logits()
        self._sums.add_load(self._update_router_bias())
        self.step += 1
        self._window.add(time.perf_counter() - start)
        return tokens

    def _clip_logits(self) -> None:
        """QK-clip on the logits this step's forward saw (Kimi K2: measured before the update, applied after it)."""
        logits = muon.max_logits(self.model)
        clipped = muon.qk_clip(self.model, self.config.qk_clip) if self.config.qk_clip > 0 else 0
        if logits:
            self._sums.add_max_logit(torch.stack(logits).max(), clipped)
        muon.track_max_logits(self.model, on=False)

    def _log_step(self) -> dict:
        """The metrics line of the steps since the last one (means over steps and ranks), written and returned."""
        summary = self._sums.summary(self.step - self._last_logged, self.dist, self.config.qk_clip > 0)
        self.last_loss = summary["loss"]
        record = {"step": self.step, "loss": summary.pop("loss"), "lr": self.lr, "tokens": self.tokens,
                  "tokens_per_s": self._window.rate(self.tokens), "grad_norm": float(full_tensor(self.grad_norm)),
                  **summary, "elapsed_s": round(self.elapsed(), 3)}
        self.log(record)
        self._sums.reset()
        self._window.restart(self.tokens)
        self._last_logged = self.step
        return record

    def log(self, record: dict) -> None:
        """Write `record` as one line of metrics.jsonl ("step" defaults to the current step); main rank only."""
        if not self.dist.is_main:
            return
        record = {"step": self.step, **record}
        if self._metrics is not None:
            self._metrics.write(record)
        else:  # outside fit(): append (the writer that trims a killed run's lines opens with fit)
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def autocast(self):
        """The context the objective runs under: bf16 autocast, or nothing in float32."""
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _update_router_bias(self) -> list[torch.Tensor]:
        """Aux-loss-free balancing after each optimizer step, on the load of the whole global batch."""
        moes = self.model.moe_layers()
        self.dist.sum_([m.tokens_per_expert for m in moes])  # every rank nudges its (replicated) bias alike
        return self.model.update_router_bias(self.gamma) if moes else []

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> dict:
        """One validation point: the validation loss (every rank), then `evaluate(model)` (main rank);
        written as one metrics line and returned."""
        record = {"step": self.step}
        if self.config.eval_batches and self.val_batches is not None:
            self.last_val_loss = record["val_loss"] = self.evaluate()
        if self.evaluate_fn is not None and self.dist.is_main:
            record.update(self.held_out())
        record.update(tokens=self.tokens, elapsed_s=round(self.elapsed(), 3))
        self.log(record)
        shown = {k: v for k, v in record.items() if k not in ("step", "tokens", "elapsed_s") and isinstance(v, (int, float))}
        self._progress.note(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        return record

    @torch.no_grad()
    def held_out(self) -> dict:
        """`evaluate(model)` as a validation point calls it: eval mode, no gradients, the autocast."""
        self.model.eval()
        try:
            with self.autocast():
                return dict(self.evaluate_fn(self.model))
        finally:
            self.model.train()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over `val_batches()` (the objective's "ce" when it reports one, so that
        MTP or balance terms do not blur the comparison), averaged over ranks."""
        self.model.eval()
        total, n = torch.zeros((), device=self.device), 0
        try:
            for batch in self.val_batches():
                with self.autocast():
                    loss, stats = self.objective(self.model, to_device(batch, self.device))
                total += torch.as_tensor(stats.get("ce", loss), device=self.device).float()
                n += 1
        finally:
            self.model.train()
        return float("nan") if n == 0 else self.dist.mean((total / n).reshape(1))[0]

    def elapsed(self) -> float:  # seconds of training over all sessions of the run
        return self.elapsed_before + (time.time() - getattr(self, "session_start", time.time()))

    def flops(self) -> float:
        """6 * N_active * tokens: N_active counts the parameters used per token, without the embedding table."""
        return 6.0 * self.params["active_without_embedding"] * self.tokens

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, path, train_state: bool = True) -> None:
        """Write a checkpoint (rank 0 writes; every rank takes part in gathering the shards): a model
        directory, or for a LoRA run an adapter directory (see state.write_checkpoint)."""
        d = self.dist
        weights = state.gather_weights(self.model, d)
        progress = {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed(),
                    "last_loss": self.last_loss, "last_val_loss": self.last_val_loss}
        captured = state.capture(self.model, self.optimizer, self.batches, d, progress, asdict(self.config)) if train_state else None
        if d.is_main:
            state.write_checkpoint(self.model, path, weights, self.model_config, tokenizer=self.tokenizer,
                                   info=self.record(), train_state=captured)
        d.barrier()

    def record(self) -> dict:
        """The checkpoint's daulat.json: the stage's `info` with the run's compute and results filled in."""
        return run_record(self.info, step=self.step, tokens=self.tokens, wall_time_s=round(self.elapsed(), 3),
                          flops_6nd=self.flops(), seq_len=self.config.seq_len, model_config=self.model_config,
                          params=self.params, dist=self.dist,
                          results={"step": self.step, "train_loss": self.last_loss, "val_loss": self.last_val_loss})
