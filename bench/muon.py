"""Muon against AdamW on the same pretraining runs, side by side in one process (`daulat pretrain`'s code path).

For each optimizer: a learning-rate sweep (one seed per rate), then more seeds at each one's best rate
(lowest final validation loss). Reported:

  * validation loss against tokens (mean over seeds at the best rate) and the lr sweep;
  * the tokens each optimizer needs to reach AdamW's best final validation loss (its mean over seeds
    at its best rate; linear interpolation between validation points), and Muon's / AdamW's ratio
    (the issue's goal: <= 0.75);
  * Muon's step-time overhead: the optimizer step alone, AdamW and Muon interleaved on the same model
    and gradients, and whole training steps (tokens/s of the runs);
  * the largest attention logit of a run with and without QK-clip (Muon at its best rate; tau defaults
    to half the unclipped run's maximum, so that the clip has something to do at this scale).

A PNG of the curves goes to bench/results/muon_<preset>.png (when matplotlib is installed).

    python bench/muon.py                                  # micro, 5 rates, 3 seeds, 100 steps
    python bench/muon.py --preset tiny --steps 300 --seeds 2

Prints a summary, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from daulat.config import load_config
from daulat.provenance import cpu_model
from daulat.train.pretrain import pretrain, schema

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="micro")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lrs", default="4e-3,8e-3,1.6e-2,3.2e-2,6.4e-2", help="comma-separated peak rates, both optimizers")
    p.add_argument("--seeds", type=int, default=3, help="seeds at the best rate (the sweep's seed 0 included)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--tau", type=float, default=None, help="QK-clip threshold (default: half the unclipped max logit)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="run directory (default: a temporary one)")
    return p.parse_args(argv)


class Runs:
    """Pretraining runs that share one tokenizer and one set of shards (prepared once)."""

    def __init__(self, root: Path, args):
        self.root, self.args = root, args
        self.base = [f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}",
                     f"train.eval_every={args.eval_every}", "train.eval_batches=4", "train.log_every=10",
                     "train.save_every=0", "train.warmup_steps=10", "train.log_max_logit=true", "data.val_fraction=0.05"]
        pretrain(load_config(schema(), preset=args.preset, overrides=self.base + ["train.steps=1"]), root / "data",
                 verbose=False)

    def run(self, name: str, *overrides: str) -> list[dict]:
        out = self.root / name
        out.mkdir(parents=True)
        for part in ("tokenizer", "data"):
            shutil.copytree(self.root / "data" / part, out / part)
        config = load_config(schema(), preset=self.args.preset, overrides=self.base + list(overrides))
        pretrain(config, out, resume=True, verbose=False)  # resume=True: reuse tokenizer/ and data/
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        shutil.rmtree(out)
        return records


def val_curve(records) -> list[tuple[int, float]]:
    return [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]


def tokens_to_reach(curve, target: float) -> float | None:
    """Tokens at which the validation curve first reaches `target` (linear between points), or None."""
    for (t0, v0), (t1, v1) in zip([(0, float("inf"))] + curve, curve):
        if v1 <= target:
            return float(t1) if v0 == float("inf") else t0 + (t1 - t0) * (v0 - target) / (v0 - v1)
    return None


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The seeds' validation curves averaged point by point (all runs validate at the same tokens)."""
    return [(points[0][0], statistics.mean(v for _, v in points)) for points in zip(*curves)]


def train_tokens_per_s(records) -> float:
    rates = [r["tokens_per_s"] for r in records if "loss" in r]
    return statistics.median(rates[1:] or rates)  # the first window holds warm-up


def optimizer_step_times(preset: str, repeats: int = 20) -> dict:
    """Median seconds of optimizer.step() alone, AdamW and Muon interleaved on one model's gradients."""
    from daulat.model import DeepseekV3
    from daulat.train.optim import TrainConfig, build_optimizer

    config = load_config(schema(), preset=preset)
    torch.manual_seed(0)
    model = DeepseekV3(config["model"])
    ids = torch.randint(0, model.config.vocab_size, (4, 65))
    model.training_loss(ids[:, :-1], ids[:, 1:])[0].backward()
    grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    optimizers = {name: build_optimizer(model, TrainConfig(optimizer=name, lr=1e-4)) for name in ("adamw", "muon")}
    times = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, opt in optimizers.items():
            for p, g in grads.items():
                p.grad = g.clone()
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def plot(path: Path, sweep: dict, curves: dict, logits: dict, target: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, seeds in curves.items():
        for i, curve in enumerate(seeds):
            a.plot([t for t, _ in curve], [v for _, v in curve], color="C0" if name == "adamw" else "C1", alpha=0.8,
                   label=f"{name} (best lr, {len(seeds)} seeds)" if i == 0 else None)
    a.axhline(target, color="grey", ls=":", label="AdamW's best final val loss")
    a.set(xlabel="tokens", ylabel="validation loss", title="at each optimizer's best lr")
    a.set_ylim(top=min(a.get_ylim()[1], target + 1.5))
    a.legend()
    for name, points in sweep.items():
        b.plot(list(points), list(points.values()), "o-", label=name)
    b.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss", title="lr sweep (seed 0)")
    b.legend()
    for name, series in logits.items():
        c.plot([s for s, _ in series], [m for _, m in series], label=name)
    c.set(xlabel="step", ylabel="max attention logit", title="max logit, Muon at its best lr")
    c.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def sweep_and_seeds(runs: Runs, args, lrs: list[float]) -> tuple[dict, dict, dict]:
    """sweep[opt][lr] = final val loss (seed 0); best[opt] = lr; records[opt] = [seed runs at best lr]."""
    sweep, best, records = {}, {}, {}
    for opt in ("adamw", "muon"):
        by_lr = {lr: runs.run(f"{opt}-{lr:g}-s0", f"train.optimizer={opt}", f"train.lr={lr}") for lr in lrs}
        sweep[opt] = {lr: val_curve(r)[-1][1] for lr, r in by_lr.items()}
        best[opt] = min(sweep[opt], key=sweep[opt].get)
        records[opt] = [by_lr[best[opt]]] + [
            runs.run(f"{opt}-best-s{seed}", f"train.optimizer={opt}", f"train.lr={best[opt]}", f"train.seed={seed}")
            for seed in range(1, args.seeds)]
        print(f"{opt}: sweep {sweep[opt]} -> best lr {best[opt]:g}", flush=True)
    return sweep, best, records


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lrs = [float(x) for x in args.lrs.split(",")]
    if len(lrs) < 2 or args.seeds < 1:
        print("give at least two --lrs and one seed", file=sys.stderr)
        return 2
    started, load_before = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        runs = Runs(Path(args.out or tmp), args)
        sweep, best, records = sweep_and_seeds(runs, args, lrs)
        unclipped = records["muon"][0]
        max_unclipped = max(r["max_logit"] for r in unclipped if "max_logit" in r)
        tau = args.tau or round(max_unclipped / 2, 3)
        clipped = runs.run("muon-clip", "train.optimizer=muon", f"train.lr={best['muon']}", f"train.qk_clip={tau}")
    step_times = optimizer_step_times(args.preset)

    finals = {opt: [val_curve(r)[-1][1] for r in rs] for opt, rs in records.items()}
    mean_curves = {opt: mean_curve([val_curve(r) for r in rs]) for opt, rs in records.items()}
    target = mean_curves["adamw"][-1][1]  # AdamW's best final val loss: its seeds' mean at its best lr
    need = {opt: tokens_to_reach(curve, target) for opt, curve in mean_curves.items()}
    ratio = need["muon"] / need["adamw"] if need["muon"] and need["adamw"] else None
    tok_s = {opt: statistics.mean(train_tokens_per_s(r) for r in rs) for opt, rs in records.items()}
    logits = {"no clip": [(r["step"], r["max_logit"]) for r in unclipped if "max_logit" in r],
              f"QK-clip tau={tau:g}": [(r["step"], r["max_logit"]) for r in clipped if "max_logit" in r]}
    png = RESULTS / f"muon_{args.preset}.png"
    plotted = plot(png, sweep, {opt: [val_curve(r) for r in rs] for opt, rs in records.items()}, logits, target)
    result = {
        "bench": "muon", "preset": args.preset, "steps": args.steps, "tokens_per_step": args.batch_size * args.seq_len,
        "lrs": lrs, "sweep_final_val_loss": {o: {f"{lr:g}": round(v, 4) for lr, v in s.items()} for o, s in sweep.items()},
        "best_lr": best, "seeds": args.seeds,
        "final_val_loss_at_best_lr": {o: [round(v, 4) for v in f] for o, f in finals.items()},
        "target_val_loss": round(target, 4), "tokens_to_target": need,
        "mean_val_curve": {o: [(t, round(v, 4)) for t, v in c] for o, c in mean_curves.items()},
        "muon_over_adamw_tokens": round(ratio, 3) if ratio else None, "goal_ratio": 0.75,
        "optimizer_step_s": {o: round(t, 5) for o, t in step_times.items()},
        "optimizer_step_overhead": round(step_times["muon"] / step_times["adamw"], 2),
        "train_tokens_per_s": {o: round(t, 1) for o, t in tok_s.items()},
        "train_step_time_ratio_muon_over_adamw": round(tok_s["adamw"] / tok_s["muon"], 3),
        "max_logit": {"no_clip": max_unclipped, "qk_clip": max(m for _, m in logits[f"QK-clip tau={tau:g}"]),
                      "last_window": {name: series[-1][1] for name, series in logits.items()},
                      "tau": tau, "clipped_heads": sum(r.get("qk_clipped_heads", 0) for r in clipped),
                      "final_val_loss_with_clip": round(val_curve(clipped)[-1][1], 4)},
        "plot": str(png) if plotted else None,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "wall_s": round(time.time() - started, 1),
    }
    print(f"AdamW best lr {best['adamw']:g}: final val {finals['adamw']}; Muon best lr {best['muon']:g}: final val "
          f"{finals['muon']}")
    print(f"tokens to AdamW's {target:.4f} (mean curves): AdamW {need['adamw']}, Muon {need['muon']} -> ratio {ratio} (goal 0.75)")
    print(f"optimizer step: AdamW {step_times['adamw'] * 1e3:.2f} ms, Muon {step_times['muon'] * 1e3:.2f} ms; "
          f"training tokens/s AdamW {tok_s['adamw']:.0f}, Muon {tok_s['muon']:.0f}")
    print(f"max logit: {max_unclipped:.3f} without QK-clip, {result['max_logit']['qk_clip']:.3f} with tau {tau:g}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
