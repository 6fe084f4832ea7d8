"""Distillation benchmark: a `tiny` teacher into a student about 9x smaller, four ways, at equal student steps.

    python bench/distill_tiny.py                         # countdown (2 numbers): about 7 minutes on one H100
    python bench/distill_tiny.py --task comparison --difficulty 3 --student-steps 1200 --eval-every 100
    python bench/distill_tiny.py --quick                 # a smoke run of every phase (minutes on 2 CPU cores)

What it does, through the same code as the CLI (daulat.train.sft.sft and daulat.train.distill.distill):

 1. a byte-level BPE tokenizer on the built-in corpus;
 2. the teacher: the `tiny` preset (about 2.4M parameters), trained from scratch by SFT on the task's
    worked solutions until it is accurate (cached in OUT/teacher, reused on later runs);
 3. one fresh student (micro with hidden 96: about 0.27M parameters), copied four times and trained for
    the same number of steps, batch size and learning-rate schedule, on the same P training prompts:
      baseline  SFT on the task's own worked solutions (the task data alone)
      sft       SFT on the teacher's answers, filtered by the checker (`daulat distill --mode sft`)
      fkl       forward KL to the teacher on its answers (`--mode fkl`)
      rkl       on-policy reverse KL on the student's own samples (`--mode rkl`)
      sft+rkl   (optional) sft for half the steps, then rkl from there: on-policy after a warm start
 4. greedy accuracy on the task's held-out split at every saved step of every run, the curves in a PNG,
    and the target: the best distillation mode reaches the baseline's final accuracy in at most a third
    of the baseline's steps, and ends higher.

Also reported: teacher and student training throughput (tokens/s from metrics.jsonl) and the teacher's
generation throughput (answer tokens/s with the engine), on whatever device it runs on.
Prints a summary, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

STUDENT_SHAPE = {"hidden_size": 96, "intermediate_size": 256, "moe_intermediate_size": 48, "kv_lora_rank": 32,
                 "num_hidden_layers": 2}
MODES = ("baseline", "sft", "fkl", "rkl", "sft+rkl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="countdown")
    parser.add_argument("--difficulty", type=int, default=2, help="the task's difficulty knob (default: %(default)s)")
    parser.add_argument("--out", default="runs/bench-distill", help="work directory (the teacher is cached there)")
    parser.add_argument("--vocab", type=int, default=512, help="tokenizer size")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--student-steps", type=int, default=1000)
    parser.add_argument("--student-lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4000, help="training prompts every student run uses")
    parser.add_argument("--eval-every", type=int, default=50, help="student steps between accuracy measurements")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems per measurement")
    parser.add_argument("--kl-temperature", type=float, default=1.0)
    parser.add_argument("--modes", default="baseline,sft,fkl,rkl",
                        help=f"runs to make, comma-separated, of {', '.join(MODES)} (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--dtype", default="float32",
                        help="train.dtype of every run (default: %(default)s; bf16 autocast on a GPU currently fails "
                             "in the model's grouped expert GEMM, whose expert weights stay float32)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--fresh", action="store_true", help="retrain the teacher even if OUT/teacher exists")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a student run already made with the same settings (OUT/student-MODE/bench.json)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps and problems")
    parser.add_argument("--plot", help="PNG of the curves (default: OUT/distill_tiny.png)")
    args = parser.parse_args()
    if args.quick:
        args.teacher_steps, args.student_steps, args.eval_every = 40, 12, 6
        args.problems, args.prompts, args.batch_size = 16, 64, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r} (known: {', '.join(MODES)})")

    from daulat.data.tasks import get_task

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    task = get_task(args.task)
    load_before = os.getloadavg()
    started = time.time()
    tok = tokenizer(out, args.vocab)
    max_tokens = answer_budget(task, tok, args.difficulty)
    say(f"task {task.name} (difficulty {task._difficulty(args.difficulty)}), answers up to {max_tokens} tokens; "
        f"device {device}")

    # -- the teacher ---------------------------------------------------------------------------------
    teacher_dir = out / "teacher"
    t = time.time()
    if args.fresh or not (teacher_dir / "final" / "model.safetensors").is_file():
        shutil.rmtree(teacher_dir, ignore_errors=True)
        init = write_init(out / "teacher-init", "tiny", {}, tok, seed=1)
        sft_run(init, teacher_dir, task, args, steps=args.teacher_steps, lr=args.teacher_lr, prompts=20000,
                device=device, save_every=0)
    teacher_train_s = time.time() - t
    teacher_eval = accuracy(teacher_dir / "final", task, tok, args, max_tokens, device)
    teacher_params = param_count(teacher_dir / "final")
    say(f"teacher: {teacher_params[0]:,} parameters, accuracy {teacher_eval['accuracy']:.3f} "
        f"({teacher_train_s:.0f}s to train or load)")

    # -- the students --------------------------------------------------------------------------------
    student_init = write_init(out / "student-init", "micro", STUDENT_SHAPE, tok, seed=0)
    student_params = param_count(student_init)
    say(f"student: {student_params[0]:,} parameters ({teacher_params[0] / student_params[0]:.1f}x smaller; "
        f"{teacher_params[1] / student_params[1]:.1f}x fewer active per token)")
    curves, runs = {}, {}
    init_acc = accuracy(student_init, task, tok, args, max_tokens, device)["accuracy"]
    signature = {k: getattr(args, k) for k in ("task", "difficulty", "vocab", "teacher_steps", "teacher_lr",
                                               "student_steps", "student_lr", "batch_size", "prompts", "eval_every",
                                               "problems", "kl_temperature", "dtype")}
    for mode in modes:
        run_dir = out / f"student-{mode}"
        record = run_dir / "bench.json"
        if args.reuse and record.is_file():
            saved = json.loads(record.read_text())
            if saved.get("signature") == {**signature, "mode": mode}:
                curves[mode], runs[mode] = [tuple(p) for p in saved["curve"]], saved["run"]
                say(f"{mode:>8}: reused {record}")
                continue
        shutil.rmtree(run_dir, ignore_errors=True)
        t = time.time()
        if mode == "baseline":
            sft_run(student_init, run_dir, task, args, steps=args.student_steps, lr=args.student_lr,
                    prompts=args.prompts, device=device, save_every=args.eval_every)
        elif mode == "sft+rkl":  # on-policy distillation as it is meant to be used: after a warm start
            half = args.student_steps // 2
            reuse_teacher_answers(out, run_dir / "sft-half")
            distill_run(teacher_dir / "final", student_init, run_dir / "sft-half", "sft", task, args, max_tokens,
                        device, steps=half)
            distill_run(teacher_dir / "final", run_dir / "sft-half" / "final", run_dir, "rkl", task, args, max_tokens,
                        device, steps=args.student_steps - half)
        else:
            if mode == "fkl":
                reuse_teacher_answers(out, run_dir)
            distill_run(teacher_dir / "final", student_init, run_dir, mode, task, args, max_tokens, device)
        train_s = time.time() - t
        t = time.time()
        curve = [(0, init_acc)]
        parts = [(run_dir / "sft-half", 0), (run_dir, args.student_steps // 2)] if mode == "sft+rkl" else [(run_dir, 0)]
        for part, offset in parts:
            for step_dir in sorted(part.glob("step-*")):
                acc = accuracy(step_dir, task, tok, args, max_tokens, device)["accuracy"]
                curve.append((offset + int(step_dir.name.split("-")[1]), acc))
        curves[mode] = curve
        runs[mode] = {"train_s": round(train_s, 1), "eval_s": round(time.time() - t, 1),
                      "tokens_per_s": throughput(run_dir / "metrics.jsonl"), "final_accuracy": curve[-1][1]}
        manifest = run_dir / "teacher_data.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            runs[mode]["teacher_data"] = {"kept": m["counts"]["kept"], "answers": m["counts"]["answers"],
                                          "teacher_accuracy_on_prompts": m["teacher_accuracy"],
                                          "generation_s": m["generation_s"],
                                          "kept_answer_tokens_per_s": generation_rate(run_dir, tok, m["generation_s"])}
        record.write_text(json.dumps({"signature": {**signature, "mode": mode}, "curve": curve, "run": runs[mode]}))
        say(f"{mode:>8}: " + " ".join(f"{s}:{a:.2f}" for s, a in curve) + f"   ({train_s:.0f}s train)")

    # -- the verdict -------------------------------------------------------------------------------------
    result = {"bench": "distill_tiny", "task": task.name, "difficulty": task._difficulty(args.difficulty),
              "device": device_name(device), "teacher_parameters": teacher_params[0],
              "student_parameters": student_params[0], "size_ratio": round(teacher_params[0] / student_params[0], 2),
              "active_ratio": round(teacher_params[1] / student_params[1], 2),
              "teacher_accuracy": teacher_eval["accuracy"], "student_steps": args.student_steps,
              "batch_size": args.batch_size, "prompts": args.prompts, "problems": teacher_eval["problems"],
              "final_accuracy": {m: runs[m]["final_accuracy"] for m in runs},
              "curves": {m: [[s, round(a, 4)] for s, a in c] for m, c in curves.items()},
              "runs": runs, "teacher_tokens_per_s": throughput(teacher_dir / "metrics.jsonl")}
    if "baseline" in curves:
        target = curves["baseline"][-1][1]
        reach = {m: next((s for s, a in c if a >= target and s > 0), None) for m, c in curves.items() if m != "baseline"}
        result["baseline_final_accuracy"] = target
        result["steps_to_baseline_final"] = reach
        best = max((m for m in reach), key=lambda m: curves[m][-1][1], default=None)
        if best is not None:
            result["best_mode"] = best
            result["target_met"] = bool(reach[best] is not None and reach[best] <= args.student_steps / 3
                                        and curves[best][-1][1] > target)
    result["wall_time_s"] = round(time.time() - started, 1)
    result["load_average"] = [round(x, 2) for x in load_before]
    plot(curves, teacher_eval["accuracy"], task.name, Path(args.plot or out / "distill_tiny.png"), result)
    say(f"final accuracy: " + ", ".join(f"{m} {a:.3f}" for m, a in result["final_accuracy"].items())
        + f"; teacher {teacher_eval['accuracy']:.3f}")
    if "target_met" in result:
        say(f"best mode {result['best_mode']}: reaches the baseline's final {result['baseline_final_accuracy']:.3f} at "
            f"step {result['steps_to_baseline_final'][result['best_mode']]} of {args.student_steps}; "
            f"target {'met' if result['target_met'] else 'NOT met'}")
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def tokenizer(out: Path, vocab: int):
    from daulat.data.tasks import default_corpus
    from daulat.tokenizer import load_tokenizer, train_tokenizer

    path = out / f"tokenizer-{vocab}"
    if not (path / "tokenizer.json").is_file():
        train_tokenizer(default_corpus(4000, seed=0), vocab_size=vocab).save(path)
    return load_tokenizer(path)


def answer_budget(task, tok, difficulty) -> int:
    """Max answer tokens: 1.5x the longest worked solution among 200 training examples, plus room to stop."""
    longest = max(len(tok.encode(e.solution_text)) for e in task.train_examples(200, seed=1, difficulty=difficulty))
    return int(longest * 1.5) + 4


def write_init(path: Path, preset: str, shape: dict, tok, seed: int) -> Path:
    from daulat.checkpoint import save_model
    from daulat.config import read_preset
    from daulat.model import DeepseekV3, ModelConfig

    config = ModelConfig(**{**read_preset(preset)["model"], **shape, "vocab_size": tok.vocab_size})
    torch.manual_seed(seed)
    save_model(DeepseekV3(config), path, tokenizer=tok,
               info={"stage": "init", "preset": preset, "shape": shape, "seed": seed})
    return path


def train_overrides(args, steps: int, lr: float, device, save_every: int) -> list[str]:
    return [f"train.steps={steps}", f"train.lr={lr}", f"train.batch_size={args.batch_size}", "train.warmup_steps=20",
            "train.schedule=\"cosine\"", "train.weight_decay=0.0", "train.log_every=10", "train.eval_batches=0",
            f"train.save_every={save_every}", "train.keep_last=0", f"train.device=\"{device.type}\"",
            f"train.dtype=\"{args.dtype}\""]


def sft_run(init: Path, out: Path, task, args, *, steps: int, lr: float, prompts: int, device, save_every: int):
    from daulat.config import load_config
    from daulat.train.sft import TRAIN_DEFAULTS, schema, sft

    overrides = train_overrides(args, steps, lr, device, save_every) + [
        f"sft.task=\"{task.name}\"", f"sft.task_examples={prompts}", "train.seq_len=256"]
    if args.difficulty is not None:
        overrides.append(f"sft.difficulty={args.difficulty}")
    config = load_config(schema(), overrides=overrides, base={"train": TRAIN_DEFAULTS})
    return sft(config, init, out, verbose=False)


def reuse_teacher_answers(out: Path, run_dir: Path) -> None:
    """Copy the sft run's teacher answers into run_dir: distill finds them made by the same teacher and
    sampling, and trains on them instead of asking the teacher again."""
    previous = out / "student-sft"
    if (previous / "teacher_data.json").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("teacher_data.jsonl", "teacher_data.json"):
            shutil.copy(previous / name, run_dir / name)


def distill_run(teacher: Path, student: Path, out: Path, mode: str, task, args, max_tokens: int, device,
                steps: int | None = None):
    from daulat.config import load_config
    from daulat.train.distill import TRAIN_DEFAULTS, distill, schema

    overrides = train_overrides(args, steps or args.student_steps, args.student_lr, device, args.eval_every) + [
        f"distill.mode=\"{mode}\"", f"distill.task=\"{task.name}\"", f"distill.prompts={args.prompts}",
        f"distill.teacher_sampling.max_tokens={max_tokens}", f"distill.student_sampling.max_tokens={max_tokens}",
        "distill.teacher_sampling.temperature=0.0", f"distill.kl_temperature={args.kl_temperature}", "train.seq_len=256"]
    if args.difficulty is not None:
        overrides.append(f"distill.difficulty={args.difficulty}")
    if args.quick:  # an untrained teacher passes nothing: keep every answer so that each phase runs
        overrides += ["distill.filter=false", "distill.drop_truncated=false"]
    config = load_config(schema(), overrides=overrides, base={"train": TRAIN_DEFAULTS})
    return distill(config, str(teacher), out, student=student, verbose=False)


def accuracy(checkpoint: Path, task, tok, args, max_tokens: int, device) -> dict:
    from daulat.checkpoint import load_checkpoint
    from daulat.eval import evaluate_task

    model = load_checkpoint(checkpoint, device=device).model
    return evaluate_task(model, tok, task, n=args.problems, max_tokens=max_tokens, difficulty=args.difficulty)


def param_count(checkpoint: Path) -> tuple[int, int]:
    from daulat.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).model
    return model.num_parameters(), model.num_parameters(active=True)


def throughput(metrics: Path) -> float | None:
    """Mean training tokens/s over the logged windows after the first (which holds warm-up)."""
    if not metrics.is_file():
        return None
    rates = [r["tokens_per_s"] for r in map(json.loads, metrics.read_text().splitlines()) if "tokens_per_s" in r]
    rates = rates[1:] or rates
    return round(sum(rates) / len(rates), 1) if rates else None


def generation_rate(run_dir: Path, tok, seconds: float) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "teacher_data.jsonl").read_text().splitlines()]
    tokens = sum(len(tok.encode(r["messages"][-1]["content"])) + 1 for r in rows)
    return round(tokens / seconds, 1) if seconds else None


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def plot(curves: dict, teacher_accuracy: float, task: str, path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"baseline": "task data alone", "sft": "sft (teacher answers)", "fkl": "fkl (forward KL)",
              "rkl": "rkl (on-policy reverse KL)",
              "sft+rkl": "sft, then rkl (half the steps each)"}
    for mode, curve in curves.items():
        steps, acc = zip(*curve)
        ax.plot(steps, acc, marker="o", markersize=3, label=labels[mode])
    ax.axhline(teacher_accuracy, color="gray", linestyle="--", label=f"teacher ({result['size_ratio']:.1f}x larger)")
    ax.set_xlabel("student optimizer steps")
    ax.set_ylabel(f"greedy accuracy, {result['problems']} held-out problems")
    ax.set_title(f"Distilling a tiny teacher into a small student: {task}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    say(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
