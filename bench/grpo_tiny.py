"""GRPO works: a `tiny` model closes the gap between its greedy accuracy and its pass@8, and gains
nothing on a task it cannot solve at all (the control).

    python bench/grpo_tiny.py --out bench-out/grpo_tiny             # pretrain + SFT + GRPO + control
    python bench/grpo_tiny.py --out DIR --pretrained runs/pt/final  # reuse a pretrained tiny model
    python bench/grpo_tiny.py --out DIR --sft runs/sft/final        # ... or an SFT'd one

Phases, each through the same code as its command (and reused from OUT when already there):

  1. pretrain the `tiny` preset on the built-in corpus            (daulat pretrain --preset tiny)
  2. SFT on the task for only --sft-steps steps, so that greedy accuracy on the held-out split stays
     well below pass@8                                              (daulat sft --task ...)
  3. greedy accuracy and pass@8 (8 samples at temperature 1) on --problems held-out problems
  4. GRPO for at most --minutes of wall time, in chunks resumed from their checkpoints, each followed
     by a greedy evaluation on 100 held-out problems for the curve (timed apart, not counted in the
     budget), so that the run stops inside the budget          (daulat grpo --task ... --resume)
  5. greedy accuracy and pass@8 again, on the same problems
  6. the control: the same GRPO on a task whose pass@8 is about 0 (by default addition of 7-digit
     numbers, far beyond the 1-3 digits of pretraining and SFT): the reward has no variance to learn from

Target: greedy accuracy closes at least half of the gap to the starting pass@8, and pass@8 does not
fall. Writes OUT/grpo_tiny.png (reward and accuracy curves) and OUT/result.json; prints a summary,
then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch


def evaluate(path, task: str, difficulty, problems: int, samples: int, max_tokens: int) -> dict:
    from daulat.checkpoint import load_checkpoint
    from daulat.eval import evaluate_task

    model, tokenizer, _ = load_checkpoint(path, need_tokenizer=True)
    result = evaluate_task(model, tokenizer, task, n=problems, samples=samples,
                           temperature=1.0, max_tokens=max_tokens, difficulty=difficulty, seed=1)
    result.pop("examples", None)
    return result


def eval_seconds(out: Path) -> float:
    """Wall time the run spent in its held-out evaluations (instrumentation, not GRPO)."""
    file = out / "metrics.jsonl"
    if not file.is_file():
        return 0.0
    return sum(json.loads(line).get("eval_s", 0.0) for line in file.read_text().splitlines() if "eval_s" in line)


def run_grpo(init, out: Path, task: str, difficulty, minutes: float, preset: str, overrides: list[str], chunk: int,
             log) -> dict:
    """GRPO in chunks resumed from their checkpoints, each followed by a held-out evaluation, until the
    next chunk would take the run past `minutes` of GRPO wall time (the evaluations' time is not
    counted: it is measured and reported apart). The first chunk is one rollout's steps, to measure."""
    from daulat.config import stage_config
    from daulat.train.grpo import grpo, schema

    if (out / "final").is_dir():  # a finished run from before: reuse it
        log(f"reusing the GRPO run in {out}")
        return {"reused": True}
    budget, start, done = minutes * 60, time.time(), 0
    base = [f"grpo.task={json.dumps(task)}", "train.eval_every=0"]
    if difficulty is not None:
        base.append(f"grpo.difficulty={difficulty}")
    config = stage_config(schema(), "grpo", preset=preset, overrides=base + overrides, train_defaults={})
    per_rollout = config["grpo"].epochs * config["grpo"].prompts_per_rollout * config["grpo"].group_size // config["train"].batch_size
    chunk = max(per_rollout, chunk // per_rollout * per_rollout)
    while True:
        spent = time.time() - start - eval_seconds(out)
        steps = per_rollout
        if done:
            per_step = 1.3 * spent / done  # a margin: the machine's speed drifts (other jobs, thermals)
            steps = min(chunk, int((budget - spent) / per_step) // per_rollout * per_rollout)
            if steps < per_rollout:
                break
        config = stage_config(schema(), "grpo", preset=preset, train_defaults={},
                              overrides=base + overrides + [f"train.steps={done + steps}", f"train.save_every={done + steps}"])
        grpo(config, init, out, resume=done > 0, verbose=True)
        done += steps
        log(f"GRPO: {done} steps, {time.time() - start - eval_seconds(out):.0f}s of {budget:.0f}s "
            f"(+{eval_seconds(out):.0f}s of held-out evaluations)")
    wall = time.time() - start
    return {"steps": done, "wall_time_s": round(wall, 1), "eval_time_s": round(eval_seconds(out), 1),
            "grpo_time_s": round(wall - eval_seconds(out), 1), "steps_per_rollout": per_rollout}


def curves(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    return {"step": [r["step"] for r in steps], "reward_mean": [r["reward_mean"] for r in steps],
            "accuracy": [r["accuracy"] for r in steps], "zero_variance_frac": [r["zero_variance_frac"] for r in steps],
            "mean_length": [r["mean_length"] for r in steps],
            "rollout_s": [r["rollout_s"] for r in steps], "update_s": [r["update_s"] for r in steps],
            "elapsed_s": [r["elapsed_s"] for r in steps],
            "eval_step": [r["step"] for r in evals], "eval_accuracy": [r["eval_accuracy"] for r in evals]}


def plot(main: dict, control: dict, start: dict, end: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, k=5):
        return [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    ax.plot(main["step"], main["reward_mean"], alpha=0.25, color="C0")
    ax.plot(main["step"], smooth(main["reward_mean"]), color="C0", label="reward (rollouts, 5-step mean)")
    ax.plot(main["step"], smooth(main["accuracy"]), color="C1", label="accuracy (rollouts, 5-step mean)")
    ax.plot(main["eval_step"], main["eval_accuracy"], "o-", color="C2", label="held-out greedy accuracy (100 problems)")
    ax.axhline(start["pass@k"]["8"], ls="--", color="C3", label=f"pass@8 at start ({start['pass@k']['8']:.2f})")
    ax.axhline(end["pass@k"]["8"], ls=":", color="C3", label=f"pass@8 at end ({end['pass@k']['8']:.2f})")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    ax.plot(control["step"], smooth(control["reward_mean"]), color="C0", label="reward (5-step mean)")
    ax.plot(control["step"], smooth(control["accuracy"]), color="C1", label="accuracy (5-step mean)")
    ax.plot(control["step"], smooth(control["zero_variance_frac"]), color="C4", label="zero-variance groups")
    ax.plot(control["eval_step"], control["eval_accuracy"], "o-", color="C2", label="held-out greedy accuracy (100 problems)")
    ax.set_title("control: a task with pass@8 near 0")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(main["step"], smooth(main["zero_variance_frac"]), color="C4", label="zero-variance groups")
    ax.plot(main["step"], [x / max(main["mean_length"]) for x in smooth(main["mean_length"])], color="C5",
            label=f"mean answer length / {max(main['mean_length']):.0f}")
    ax.set_title("main run: groups without signal, answer length")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out/grpo_tiny", help="output directory (phases are reused from it)")
    parser.add_argument("--pretrained", help="a pretrained tiny checkpoint to start from (default: pretrain one into OUT)")
    parser.add_argument("--sft", help="an SFT'd checkpoint to start GRPO from (default: SFT the pretrained one into OUT)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--task", default="addition")
    parser.add_argument("--difficulty", type=int, help="default: the task's own")
    parser.add_argument("--sft-steps", type=int, default=100, help="SFT steps: few, so that greedy < pass@8")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems for greedy accuracy and pass@8")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--minutes", type=float, default=15.0, help="GRPO wall-time budget (held-out evaluations not counted)")
    parser.add_argument("--chunk", type=int, default=40, help="GRPO steps between held-out evaluations")
    parser.add_argument("--control-task", default="addition")
    parser.add_argument("--control-difficulty", type=int, default=7)
    parser.add_argument("--control-minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", help="extra grpo.*/train.* overrides for both GRPO runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.time()

    def log(text):
        print(f"[{time.time() - t0:7.0f}s] {text}", flush=True)

    # 1. pretrain (not needed when an SFT'd checkpoint is given)
    if args.pretrained or args.sft:
        pretrained = Path(args.pretrained) if args.pretrained else None
    else:
        pretrained = out / "pretrain" / "final"
        if not pretrained.is_dir():
            from daulat.config import load_config
            from daulat.train.pretrain import pretrain, schema

            log("pretraining the tiny preset")
            pretrain(load_config(schema(), preset=args.preset, overrides=["train.save_every=0"]), out / "pretrain",
                     resume=(out / "pretrain").is_dir())

    # 2. SFT
    sft_final = Path(args.sft) if args.sft else out / "sft" / "final"
    if not sft_final.is_dir():
        from daulat.config import stage_config
        from daulat.train.sft import schema as sft_schema
        from daulat.train.sft import sft

        overrides = [f"sft.task={json.dumps(args.task)}", f"train.steps={args.sft_steps}", "train.save_every=0"]
        if args.difficulty is not None:
            overrides.append(f"sft.difficulty={args.difficulty}")
        log(f"SFT on {args.task} for {args.sft_steps} steps")
        sft(stage_config(sft_schema(), "sft", preset=args.preset, overrides=overrides, train_defaults={}), pretrained,
            out / "sft", resume=(out / "sft").is_dir())

    # 3. start
    def cached_eval(name, path, task, difficulty):
        file = out / f"eval-{name}.json"
        if file.is_file():
            return json.loads(file.read_text())
        log(f"evaluating {name}: greedy and pass@{args.samples} on {args.problems} held-out problems")
        result = evaluate(path, task, difficulty, args.problems, args.samples, args.max_tokens)
        file.write_text(json.dumps(result, indent=1))
        return result

    start = cached_eval("start", sft_final, args.task, args.difficulty)
    log(f"start: greedy {start['accuracy']:.3f}, pass@{args.samples} {start['pass@k'][str(args.samples)]:.3f}")

    # 4-5. GRPO and the end
    timing = run_grpo(sft_final, out / "grpo", args.task, args.difficulty, args.minutes, args.preset, args.overrides,
                      args.chunk, log)
    end = cached_eval("end", out / "grpo" / "final", args.task, args.difficulty)
    log(f"end: greedy {end['accuracy']:.3f}, pass@{args.samples} {end['pass@k'][str(args.samples)]:.3f}")

    # 6. the control
    control_start = cached_eval("control-start", sft_final, args.control_task, args.control_difficulty)
    control_timing = run_grpo(sft_final, out / "control", args.control_task, args.control_difficulty,
                              args.control_minutes, args.preset, args.overrides, args.chunk, log)
    control_end = cached_eval("control-end", out / "control" / "final", args.control_task, args.control_difficulty)

    main_curves, control_curves = curves(out / "grpo"), curves(out / "control")
    k = str(args.samples)
    gap = start["pass@k"][k] - start["accuracy"]
    closed = (end["accuracy"] - start["accuracy"]) / gap if gap > 0 else float("nan")
    # pass@k over P problems has a standard error of at most sqrt(p(1-p)/P); allow two of them
    pass_se = math.sqrt(max(start["pass@k"][k] * (1 - start["pass@k"][k]), 1e-4) / start["problems"])
    png = out / "grpo_tiny.png"
    plot(main_curves, control_curves, start, end, png,
         f"GRPO, tiny preset, {args.task}: greedy {start['accuracy']:.2f} -> {end['accuracy']:.2f}")
    zero_var = control_curves["zero_variance_frac"]
    result = {
        "bench": "grpo_tiny", "task": args.task, "difficulty": start["difficulty"], "problems": start["problems"],
        "greedy_start": start["accuracy"], "greedy_end": end["accuracy"],
        f"pass@{k}_start": start["pass@k"][k], f"pass@{k}_end": end["pass@k"][k],
        "pass@1_start": start["pass@k"]["1"], "pass@1_end": end["pass@k"]["1"],
        "gap_closed": closed, "target_gap_closed": closed >= 0.5,
        f"target_pass@{k}_held": end["pass@k"][k] >= start["pass@k"][k] - 2 * pass_se,
        "grpo_steps": timing.get("steps"), "grpo_time_s": timing.get("grpo_time_s"),
        "grpo_eval_time_s": timing.get("eval_time_s"),
        "mean_rollout_s_per_step": sum(main_curves["rollout_s"]) / max(1, len(main_curves["rollout_s"])),
        "mean_update_s_per_step": sum(main_curves["update_s"][1:]) / max(1, len(main_curves["update_s"]) - 1),
        "control": {"task": args.control_task, "difficulty": control_start["difficulty"],
                    "greedy_start": control_start["accuracy"], "greedy_end": control_end["accuracy"],
                    f"pass@{k}_start": control_start["pass@k"][k], f"pass@{k}_end": control_end["pass@k"][k],
                    "mean_zero_variance_frac": sum(zero_var) / max(1, len(zero_var)),
                    "grpo_steps": control_timing.get("steps"), "grpo_time_s": control_timing.get("grpo_time_s")},
        "png": str(png),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "total_wall_time_s": round(time.time() - t0, 1),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    c = result["control"]
    print(f"\n{args.task} (difficulty {start['difficulty']}), {start['problems']} held-out problems:")
    print(f"  greedy accuracy  {start['accuracy']:.3f} -> {end['accuracy']:.3f}   "
          f"(closes {closed:.0%} of the gap to the starting pass@{k}; target >= 50%)")
    print(f"  pass@{k}           {start['pass@k'][k]:.3f} -> {end['pass@k'][k]:.3f}")
    print(f"  GRPO: {timing.get('steps')} steps in {timing.get('grpo_time_s')}s "
          f"(+{timing.get('eval_time_s')}s of held-out evaluations for the curve)")
    print(f"control {c['task']} (difficulty {c['difficulty']}): greedy {c['greedy_start']:.3f} -> {c['greedy_end']:.3f}, "
          f"pass@{k} {c[f'pass@{k}_start']:.3f} -> {c[f'pass@{k}_end']:.3f}, "
          f"zero-variance groups {c['mean_zero_variance_frac']:.0%} of all")
    print(f"curves: {png}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
