"""Validation loss at equal training FLOPs: the `tiny` MoE against a dense model of the same active parameters.

DeepSeek's claim is that a fine-grained MoE reaches a lower loss than a dense model for the same
compute. Here both models are the `tiny` preset's MLA stack with the same width, depth, attention,
vocabulary, data, batches, schedule and seed; they differ only in the feed-forward blocks:

  * moe:   layer 0 dense SwiGLU (intermediate_size), layers 1.. DeepSeekMoE (1 shared + top-2 of 8 routed);
  * dense: every layer a dense SwiGLU whose width is chosen so that the parameters used per token
           (`num_parameters(active=True)`) equal the MoE's.

Equal active parameters and equal tokens give equal training FLOPs (6 * N_active * tokens, reported).
Both runs go through `daulat pretrain`'s code path and share one tokenizer and one validation split.
Wall-clock time is reported too: on a CPU the MoE's routing and gather/scatter cost time that the
FLOP count does not show.

    python bench/moe_vs_dense.py                  # 250 steps each
    python bench/moe_vs_dense.py --steps 500 --threads 2 --seed 1

Prints a summary, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from daulat.config import load_config
from daulat.model import DeepseekV3
from daulat.train.pretrain import pretrain, schema


def dense_width(moe_config, vocab_size: int) -> int:
    """The dense SwiGLU width whose all-dense model has the MoE model's active parameters per token."""
    from dataclasses import replace

    def active(config):
        with torch.device("meta"):
            return DeepseekV3(config).num_parameters(active=True)

    moe_config = replace(moe_config, vocab_size=vocab_size)
    target = active(moe_config)
    layers = moe_config.num_hidden_layers
    base = replace(moe_config, first_k_dense_replace=layers, intermediate_size=1)
    per_unit = active(replace(base, intermediate_size=2)) - active(base)  # 3 * hidden * layers
    return round((target - active(base)) / per_unit) + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps of each run (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default: %(default)s)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", help="directory for both runs (default: a temporary one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = [f"train.steps={args.steps}", f"train.seed={args.seed}", "train.save_every=0", f"train.eval_every={args.steps}",
                 "train.eval_batches=8", "data.val_fraction=0.02"]
    moe_cfg = load_config(schema(), preset=args.preset, overrides=overrides)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        runs = {"moe": moe_cfg, "dense": None}
        for name in runs:
            out = root / name
            tokenizer = None
            config = runs[name]
            if name == "dense":
                tokenizer = root / "moe" / "tokenizer"
                vocab = json.loads((root / "moe" / "final" / "config.json").read_text())["vocab_size"]
                width = dense_width(moe_cfg["model"], vocab)
                layers = moe_cfg["model"].num_hidden_layers
                config = load_config(schema(), preset=args.preset, overrides=overrides + [
                    f"model.first_k_dense_replace={layers}", f"model.intermediate_size={width}"])
            start = time.time()
            summary = pretrain(config, out, tokenizer=tokenizer, verbose=False)
            wall = time.time() - start
            info = json.loads((out / "final" / "daulat.json").read_text())
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            rates = [r["tokens_per_s"] for r in records if "loss" in r][1:]
            results[name] = {
                "val_loss": round(summary["val_loss"], 4), "train_loss": round(summary["loss"], 4),
                "active_parameters": info["active_parameters_per_token"], "parameters": info["parameters"],
                "training_flops": info["compute"]["flops_6nd"], "tokens": summary["tokens"],
                "tokens_per_s": round(sum(rates) / len(rates), 1) if rates else None,
                "wall_seconds": round(wall, 1),
                "intermediate_size": config["model"].intermediate_size,
                "first_k_dense_replace": config["model"].first_k_dense_replace,
            }
            print(f"{name:>5}: val loss {results[name]['val_loss']:.4f} (train {results[name]['train_loss']:.4f}); "
                  f"{results[name]['active_parameters']:,} active of {results[name]['parameters']:,} parameters; "
                  f"{results[name]['training_flops']:.3e} FLOPs; {results[name]['tokens_per_s']} tok/s; {wall:.0f}s",
                  file=sys.stderr)

    moe, dense = results["moe"], results["dense"]
    winner = "moe" if moe["val_loss"] < dense["val_loss"] else "dense"
    result = {
        "bench": "moe_vs_dense", "preset": args.preset, "steps": args.steps, "seed": args.seed,
        "tokens_per_step": moe_cfg["train"].batch_size * moe_cfg["train"].seq_len,
        "moe": moe, "dense": dense,
        "val_loss_moe_minus_dense": round(moe["val_loss"] - dense["val_loss"], 4),
        "flops_ratio_moe_over_dense": round(moe["training_flops"] / dense["training_flops"], 4),
        "lower_val_loss_at_equal_flops": winner,
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(f"at equal training FLOPs the {winner} model reaches the lower validation loss "
          f"({moe['val_loss']:.4f} MoE vs {dense['val_loss']:.4f} dense)", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
