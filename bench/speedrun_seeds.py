"""The speedrun for several seeds: does every stage do what it claims, for each seed?

    python bench/speedrun_seeds.py                              # --preset tiny, seeds 0 1 2 (15 min each, idle 2 cores)
    python bench/speedrun_seeds.py --preset micro --seeds 0     # a smoke run
    python bench/speedrun_seeds.py --seeds 0 1 speedrun.sft_steps=50   # overrides go to every speedrun
    python bench/speedrun_seeds.py --measure-threads          # 1 against 2 torch threads, tiny pretraining step

Runs `daulat speedrun --preset P --seed S --out OUT/seed-S` for each seed, one after the other (a run
directory that is already finished is reused: the speedrun checks that its settings are the same),
then prints, per seed and stage: the held-out greedy accuracy with its 95% Wilson interval, pass@k,
and the wall and CPU time of training and evaluation; then the issue's targets (SFT >= 0.60, GRPO >=
SFT + 0.10 with pass@k not below SFT's, the >= 5x smaller distilled student >= 0.8 x the teacher and
>= 0.10 above the same student trained directly) met or missed per seed. The peer every figure is
compared with is in the same run: the stage before, and the student trained directly. One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

STAGES = ["pretrain", "sft", "grpo", "distill", "student-direct"]


def run_seed(preset: str, seed: int, out: Path, threads: int, overrides: list[str]) -> dict:
    """One speedrun (a subprocess, as a user runs it); its wall and CPU seconds."""
    cmd = [sys.executable, "-m", "daulat.cli", "speedrun", "--preset", preset, "--seed", str(seed), "--out", str(out),
           "--threads", str(threads), *overrides]
    t0, before = time.time(), os.times()
    log = out.parent / f"seed-{seed}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    after = os.times()
    if proc.returncode:
        raise SystemExit(f"seed {seed}: speedrun failed (exit {proc.returncode}); see {log}")
    return {"wall_s": round(time.time() - t0, 1),
            "cpu_s": round((after.children_user + after.children_system) - (before.children_user + before.children_system), 1)}


def seed_figures(out: Path) -> dict:
    """Per stage: accuracy, its interval, pass@k, train and eval times (from the run's own files)."""
    summary = json.loads((out / "speedrun.json").read_text())
    train_times = summary.get("stage_times_this_invocation", {})
    eval_times = summary.get("eval_times_this_invocation", {})
    stages = {}
    for name in STAGES:
        e = json.loads((out / "eval" / f"{name}.json").read_text())
        k = max(e["pass@k"], key=int)
        info = json.loads((out / name / "final" / "daulat.json").read_text())
        stages[name] = {"accuracy": e["accuracy"], "ci95": e["accuracy_ci95"], "problems": e["problems"],
                        "k": int(k), "pass@k": e["pass@k"][k], "parameters": e.get("parameters"),
                        "train": train_times.get(name) or {"wall_s": info.get("compute", {}).get("wall_time_s")},
                        "eval": eval_times.get(name)}
    return stages


def targets(stages: dict) -> dict:
    """The issue's targets for one seed: each True or False."""
    acc = {n: s["accuracy"] for n, s in stages.items()}
    smaller = stages["grpo"]["parameters"] / max(1, stages["distill"]["parameters"])
    return {
        "sft>=0.60": acc["sft"] >= 0.60,
        "grpo>=sft+0.10": acc["grpo"] >= acc["sft"] + 0.10,
        "grpo_pass@k>=sft": stages["grpo"]["pass@k"] >= stages["sft"]["pass@k"],
        "student>=5x_smaller": smaller >= 5,
        "distill>=0.8*teacher": acc["distill"] >= 0.8 * acc["grpo"],
        "distill>=direct+0.10": acc["distill"] >= acc["student-direct"] + 0.10,
    }


def print_table(results: dict) -> None:
    print(f"{'seed':>4} {'stage':<15} {'acc':>6} {'95% interval':>14} {'pass@k':>8} "
          f"{'train wall/cpu s':>17} {'eval wall/cpu s':>16}")
    for seed, stages in results.items():
        for name, s in stages.items():
            t, e = s["train"] or {}, s["eval"] or {}
            print(f"{seed:>4} {name:<15} {s['accuracy']:6.3f} {s['ci95'][0]:6.3f}–{s['ci95'][1]:6.3f} "
                  f"{s['pass@k']:8.3f} {t.get('wall_s', ''):>8}/{t.get('cpu_s', ''):<8} "
                  f"{e.get('wall_s', ''):>7}/{e.get('cpu_s', ''):<8}")


def measure_threads(repeats: int = 4) -> dict:
    """Wall and CPU seconds of one tiny pretraining step (16 x 256 tokens, AdamW) with 1 and with 2
    torch threads, alternating, median of `repeats`: what the speedrun's --threads default rests on."""
    import torch

    from daulat.config import load_config
    from daulat.model import DeepseekV3, ModelConfig

    torch.manual_seed(0)
    model = DeepseekV3(load_config({"model": ModelConfig}, preset="tiny")["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, model.config.vocab_size, (16, 257))

    def step():
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    measured = {1: [], 2: []}
    for _ in range(repeats):
        for threads in measured:
            torch.set_num_threads(threads)
            step()  # warm-up at this thread count
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            measured[threads].append((time.perf_counter() - t0, time.process_time() - c0))
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {t: {"wall_s": round(median([w for w, _ in v]), 2), "cpu_s": round(median([c for _, c in v]), 2)}
            for t, v in measured.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-speedrun-seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure-threads", action="store_true", help="only time a tiny pretraining step, 1 vs 2 threads")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    if args.measure_threads:
        print(json.dumps({"bench": "speedrun_threads", "per_step": measure_threads(), "load_average": os.getloadavg()}))
        return 0
    load_before = os.getloadavg()
    results, times, met = {}, {}, {}
    for seed in args.seeds:
        out = Path(args.out) / args.preset / f"seed-{seed}"
        times[seed] = run_seed(args.preset, seed, out, args.threads, args.overrides)
        results[seed] = seed_figures(out)
        met[seed] = targets(results[seed])
        print(f"seed {seed}: {times[seed]['wall_s']} s wall, {times[seed]['cpu_s']} s CPU; "
              + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met[seed].items()), flush=True)
    print_table(results)
    all_met = all(all(m.values()) for m in met.values())
    print(f"every target for every seed: {'met' if all_met else 'not met'}")
    import torch

    print(json.dumps({"bench": "speedrun_seeds", "preset": args.preset, "seeds": args.seeds, "overrides": args.overrides,
                      "threads": args.threads, "results": results, "times": times, "targets": met,
                      "all_targets_met": all_met, "load_average_before": load_before,
                      "load_average_after": os.getloadavg(), "cpu": platform.processor() or platform.machine(),
                      "cores": os.cpu_count(), "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
