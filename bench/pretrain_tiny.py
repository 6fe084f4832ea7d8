"""Pretraining throughput of the `tiny` preset through the real pipeline (`daulat pretrain`'s code path).

Two phases, as `daulat pretrain --preset tiny` runs them:
  1. data: tokenizer training and sharding of the built-in corpus (timed on their own);
  2. training: `--steps` optimizer steps (default: the preset's, i.e. the whole run) on those shards,
     started fresh in a second directory that already holds them (as a resumed run reuses them).

Reported: training tokens/s over the steps (validation and checkpoints excluded; the first logged
window, which holds warm-up, left out), tokens per CPU-second of the process (a figure that a busy,
shared machine disturbs less than wall time), the wall time of each phase, and the final losses.

    python bench/pretrain_tiny.py                 # the whole tiny run (about 10 minutes on 2 cores)
    python bench/pretrain_tiny.py --steps 100     # a shorter measurement
    python bench/pretrain_tiny.py --threads 1

Prints a summary, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from daulat.config import load_config
from daulat.train.pretrain import pretrain, schema


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = ["train.save_every=0"]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    config = load_config(schema(), preset=args.preset, overrides=overrides)
    prep_config = load_config(schema(), preset=args.preset, overrides=["train.steps=1", "train.eval_batches=0"])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        start = time.time()
        pretrain(prep_config, root / "data-phase", verbose=True)  # tokenizer + shards (+ one step)
        data_seconds = time.time() - start
        out = root / "run"
        out.mkdir(parents=True)
        for part in ("tokenizer", "data"):
            shutil.copytree(root / "data-phase" / part, out / part)
        start, cpu_start = time.time(), time.process_time()
        summary = pretrain(config, out, resume=True, verbose=True)  # reuses tokenizer/ and data/
        train_wall, cpu_seconds = time.time() - start, time.process_time() - cpu_start
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        info = json.loads((out / "final" / "daulat.json").read_text())
    load_after = os.getloadavg()

    train = [r for r in records if "loss" in r]
    # every logged window after the first: its tokens, and its step time (= tokens / its rate)
    windows = [(b["tokens"] - a["tokens"], b["tokens_per_s"]) for a, b in zip(train, train[1:])] or \
              [(train[0]["tokens"], train[0]["tokens_per_s"])]
    tokens = sum(n for n, _ in windows)
    seconds = sum(n / rate for n, rate in windows)
    tokens_per_s = tokens / seconds
    train_cfg = config["train"]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    result = {
        "bench": "pretrain_tiny", "preset": args.preset, "steps": summary["step"],
        "tokens_per_step": train_cfg.batch_size * train_cfg.seq_len, "tokens": summary["tokens"],
        "train_tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_cpu_second": round(summary["tokens"] / cpu_seconds, 1),
        "train_seconds": round(summary["tokens"] / tokens_per_s, 1),
        "data_phase_seconds": round(data_seconds, 1),
        "training_phase_seconds": round(train_wall, 1),
        "wall_seconds_total": round(data_seconds + train_wall, 1),
        "final_loss": round(summary["loss"], 4), "final_val_loss": round(val[-1], 4) if val else None,
        "parameters": info["parameters"], "active_parameters_per_token": info["active_parameters_per_token"],
        "vocab_size": info["config"]["model"]["vocab_size"],
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }
    print(f"{args.preset}: {result['train_tokens_per_s']:.0f} training tokens/s over {result['steps']} steps; "
          f"{result['tokens_per_cpu_second']:.0f} tokens per CPU-second; data {data_seconds:.0f}s + training {train_wall:.0f}s; "
          f"final loss {result['final_loss']}, val loss {result['final_val_loss']}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
