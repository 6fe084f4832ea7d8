"""What a run reports while it trains: OUT/metrics.jsonl (and TensorBoard), the progress bar, throughput
and the routed experts' load.

    metrics.jsonl   one JSON object per line: per logged step {"step", "loss", "lr", "tokens",
                    "tokens_per_s", "grad_norm", <objective stats>, "expert_load_max_over_mean",
                    "expert_load", "elapsed_s"}, per validation {"step", "val_loss"?, <evaluate()'s
                    keys>, "tokens", "elapsed_s"}, and whatever a stage logs through Trainer.log
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"


def count_tokens(batch) -> int:
    """Tokens in a batch: the first tensor's elements (inputs of (inputs, targets), or input_ids)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        return count_tokens(batch.get("input_ids", next(iter(batch.values()))))
    if isinstance(batch, (tuple, list)):
        return count_tokens(batch[0])
    raise TypeError(f"cannot count the tokens of a {type(batch).__name__} batch; pass batch_tokens=")


class MetricsLog:
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
        self.file = self.writer = None


class Progress:
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


class Window:
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


class StepSums:
    """Loss, objective stats and expert load summed over the steps since the last log, kept as tensors
    on the device so that no step waits for a host sync."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.stats: dict[str, torch.Tensor] = {}
        self.load: list[torch.Tensor] | None = None
        self.max_logit: torch.Tensor | None = None  # largest attention logit of any head (when tracked)
        self.clipped_heads = 0  # heads QK-clip rescaled

    def add_micro(self, loss: torch.Tensor, stats: dict, grad_accum: int) -> None:
        """One micro-batch's loss and stats, each a 1 / grad_accum share of the step's."""
        self.loss += loss.detach().float() / grad_accum
        for key, value in stats.items():
            value = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach()
            self.stats[key] = self.stats.get(key, 0) + value / grad_accum

    def add_load(self, loads: list[torch.Tensor]) -> None:
        self.load = loads if self.load is None else [a + b for a, b in zip(self.load, loads)]

    def add_max_logit(self, value: torch.Tensor, clipped_heads: int) -> None:
        self.max_logit = value if self.max_logit is None else torch.maximum(self.max_logit, value)
        self.clipped_heads += clipped_heads

    def summary(self, steps: int, dist, clipping: bool) -> dict:
        """Mean loss and stats over `steps` steps and all ranks; expert load, max logit, clipped heads."""
        means = dist.mean(torch.stack([self.loss, *self.stats.values()]) / steps)
        out = {"loss": means[0], **dict(zip(self.stats, means[1:]))}
        if self.load:
            out.update(expert_load_metrics(self.load))
        if self.max_logit is not None:
            out["max_logit"] = round(self.max_logit.item(), 4)
            if clipping:
                out["qk_clipped_heads"] = self.clipped_heads
        return out


def expert_load_metrics(loads: list[torch.Tensor]) -> dict:
    """Per MoE layer: max / mean tokens per expert (1.0 is perfect balance) and each expert's share."""
    ratio, share = [], []
    for load in loads:
        load = load.float().cpu()
        total = load.sum().item()
        ratio.append(round(load.max().item() / load.mean().item(), 4) if total > 0 else None)
        share.append([round(x, 4) for x in (load / total).tolist()] if total > 0 else None)
    return {"expert_load_max_over_mean": ratio, "expert_load": share}


def parameter_counts(model) -> dict:
    """total, active (per token) and active_without_embedding: the N of 6 N FLOPs per token (forward
    2N + backward 4N) leaves out the embedding table (a lookup, not a matmul) unless the head is tied to
    it; attention's T^2 term is left out (small at these lengths)."""
    active = model.num_parameters(active=True)
    embedding = 0 if model.config.tie_word_embeddings else model.embed_tokens.weight.numel()
    return {"total": model.num_parameters(), "active": active, "active_without_embedding": active - embedding}


def run_record(info: dict, *, step: int, tokens: int, wall_time_s: float, flops_6nd: float, seq_len: int,
               model_config, params: dict, dist, results: dict) -> dict:
    """A checkpoint's daulat.json: the stage's `info` (daulat.provenance.stage_info) plus step and tokens,
    `compute` (tokens, wall time, FLOPs, parameters, hardware, energy estimate) and `metrics` (the
    results that are known), the record the model card is rendered from."""
    from daulat.provenance import energy_estimate, training_flops
    from daulat.train.distributed import hardware

    record = dict(info, step=step, tokens=tokens)
    record["compute"] = dict(info.get("compute") or {}, tokens=tokens, wall_time_s=wall_time_s,
                             flops=training_flops(model_config, tokens, seq_len, params["active_without_embedding"]),
                             flops_6nd=flops_6nd, parameters_total=params["total"], parameters_active=params["active"],
                             hardware=hardware(dist),
                             energy=energy_estimate(wall_time_s, dist.device.type, dist.world_size, torch.get_num_threads()))
    record["metrics"] = dict(info.get("metrics") or {}, **{k: v for k, v in results.items() if v is not None})
    return record
