"""Distillation on the tiny speedrun: which way of handing the teacher to a 5x smaller student beats
training that student directly, on finished speedruns (one per seed).

    daulat speedrun --preset tiny --out runs/tiny-s0 --seed 0      # and seeds 1, 2
    python bench/distill_tiny.py --runs runs/tiny-s0 runs/tiny-s1 runs/tiny-s2
    python bench/distill_tiny.py --runs runs/tiny-s0 --variants direct fkl-pruned rkl-pruned

Each run's teacher is its GRPO checkpoint and each variant is that run's own distillation command
(OUT/distill/speedrun-settings.json: the student preset, the steps, the optimizer settings, the 2,000
training prompts) with only the mode, the student's start and what it trains on changed; `direct` is
the run's own student trained directly (OUT/student-direct/speedrun-settings.json). So every variant
takes the same optimizer steps on the same prompts. The variants the speedrun itself trained (`direct`,
and its own mode: `fkl-pruned` for tiny) are read from its evaluations rather than trained again. Variants:

  direct          random weights, SFT on the task's worked solutions: no teacher (the speedrun's baseline)
  direct-lr3e-3   the same at lr 3e-3 (the distillation's 1e-3 suits a pruned start; a random one learns faster higher)
  pruned-gold     the teacher pruned to the student's shape (daulat.prune), then the next-token loss on
                  the task's worked solutions: what the teacher's weights alone give, without its outputs
  fkl-random      random weights, forward KL to the teacher's distributions on its answers
  sft-pruned      pruned, then SFT on the teacher's answers (sequence-level distillation)
  fkl-pruned      pruned, then forward KL to the teacher's distributions on its answers
  rkl-pruned      pruned, then on-policy reverse KL on the student's own samples (about 10x slower a step)

Greedy accuracy of each on the run's held-out problems (its [speedrun] eval_problems) with its 95%
Wilson interval. Prints a table, then one JSON line last. Variants are run in this process one after
another (start one process per run to use more cores; each should be given one thread).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

VARIANTS = {
    "direct": None,  # the run's own student-direct command
    "direct-lr3e-3": None,  # ... at the learning rate a student from random weights trains best at
    "pruned-gold": ["--mode", "fkl", "distill.student_init=pruned", "distill.sequences=given", "distill.ce_weight=1.0"],
    "fkl-random": ["--mode", "fkl", "distill.student_init=random"],
    "sft-pruned": ["--mode", "sft", "distill.student_init=pruned"],
    "fkl-pruned": ["--mode", "fkl", "distill.student_init=pruned"],
    "rkl-pruned": ["--mode", "rkl", "distill.student_init=pruned"],
}
DEFAULT = ["direct", "direct-lr3e-3", "pruned-gold", "fkl-random", "sft-pruned", "fkl-pruned"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="OUT", help="finished tiny speedruns")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT)
    parser.add_argument("--out", default="runs/bench-distill", help="work directory (one folder per run and variant)")
    parser.add_argument("--threads", default="1", help="torch threads of every variant (default: %(default)s)")
    args = parser.parse_args()

    from daulat.threads import set_threads

    set_threads(int(args.threads))
    rows = {}
    for run in map(Path, args.runs):
        summary = json.loads((run / "speedrun.json").read_text())
        seed, sr = summary["seed"], summary["config"]["speedrun"]
        for variant in args.variants:
            out = Path(args.out) / f"{run.name}-{variant}"
            t0 = time.process_time()
            result = run_own(run, variant)
            if result is None:
                train(run, variant, out, args.threads)
                result = accuracy(out / "final", sr, seed)
            result["cpu_s"] = round(time.process_time() - t0, 1)
            rows.setdefault(variant, {})[seed] = result
            say(f"{run.name} seed {seed} {variant}: greedy {result['accuracy']:.3f} "
                f"({result['accuracy_ci95'][0]:.3f}-{result['accuracy_ci95'][1]:.3f}) on {result['problems']}, {result['cpu_s']} CPU s")
        rows.setdefault("teacher (GRPO)", {})[seed] = json.loads((run / "eval" / "grpo.json").read_text())
    print_table(rows)
    print(json.dumps({"bench": "distill_tiny", "runs": [str(r) for r in args.runs],
                      "accuracy": {v: {str(s): r["accuracy"] for s, r in by.items()} for v, by in rows.items()}}))
    return 0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def stage_command(run: Path, stage: str) -> list[str]:
    """The command the speedrun ran for `stage`, with its run directory put back in."""
    settings = json.loads((run / stage / "speedrun-settings.json").read_text())
    return [f"{run}{a[3:]}" if a == "OUT" or a.startswith("OUT/") else a for a in settings["command"]]


def run_own(run: Path, variant: str) -> dict | None:
    """The run's own evaluation when `variant` is what the speedrun itself trained (its student trained
    directly, and its distillation), else None."""
    own = None
    if variant == "direct":
        own = "student-direct"
    elif VARIANTS[variant] is not None:
        argv = stage_command(run, "distill")
        if argv[argv.index("--mode") + 1] == VARIANTS[variant][1] and all(a in argv for a in VARIANTS[variant][2:]):
            own = "distill"
    if own is None:
        return None
    result = json.loads((run / "eval" / f"{own}.json").read_text())
    return {k: result[k] for k in ("accuracy", "problems", "accuracy_ci95", "parameters")} | {"from": f"OUT/eval/{own}.json"}


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def train(run: Path, variant: str, out: Path, threads: str) -> None:
    from daulat.cli import main as daulat

    if (out / "final").is_dir():
        return
    shutil.rmtree(out, ignore_errors=True)
    if VARIANTS[variant] is None:
        argv = _replace(stage_command(run, "student-direct"), "--out", str(out))
        argv += ["train.lr=3e-3"] if variant == "direct-lr3e-3" else []
    else:
        argv = _replace(stage_command(run, "distill"), "--out", str(out))
        argv = _replace(argv, "--mode", VARIANTS[variant][1]) + VARIANTS[variant][2:]
        out.mkdir(parents=True)
        for name in ("teacher_data.jsonl", "teacher_data.json"):  # the run's teacher answers, reused where they fit
            if (run / "distill" / name).is_file():
                shutil.copy(run / "distill" / name, out / name)
    say(f"== daulat {' '.join(argv)}")
    if daulat([*argv, f"train.threads={threads}"]):
        raise SystemExit(f"variant {variant} of {run} failed")


def accuracy(ckpt: Path, sr: dict, seed: int) -> dict:
    from daulat.checkpoint import load_checkpoint
    from daulat.data.tasks import get_task
    from daulat.eval import evaluate_task
    from daulat.report import wilson_interval

    model, tokenizer, _ = load_checkpoint(ckpt)
    result = evaluate_task(model, tokenizer, get_task(sr["task"]), n=sr["eval_problems"], samples=0,
                           max_tokens=sr["eval_sampling"]["max_tokens"], seed=seed)
    correct = round(result["accuracy"] * result["problems"])
    return {"accuracy": result["accuracy"], "problems": result["problems"],
            "accuracy_ci95": list(wilson_interval(correct, result["problems"])), "parameters": model.num_parameters()}


def print_table(rows: dict) -> None:
    seeds = sorted({s for by in rows.values() for s in by})
    print("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for variant, by in rows.items():
        cells = [f"{by[s]['accuracy']:.3f} ({by[s]['accuracy_ci95'][0]:.3f}–{by[s]['accuracy_ci95'][1]:.3f})"
                 if s in by else "—" for s in seeds]
        mean = sum(by[s]["accuracy"] for s in by) / len(by)
        print(f"| {variant} | " + " | ".join(cells) + f" | {mean:.3f} |")


if __name__ == "__main__":
    raise SystemExit(main())
