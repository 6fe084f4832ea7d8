"""`daulat speedrun`: from nothing to a served model in one command.

    tokenizer + pretrain -> SFT -> GRPO -> distill into a smaller student -> eval -> report
                                       + the same student trained directly (the baseline distillation must beat)

Each stage is the stage command a user would run by hand (`daulat pretrain`, `daulat sft`, ...),
writing into its own directory under OUT. A stage whose `final/` checkpoint exists is done and is
not run again; one that was interrupted continues from its newest checkpoint (`--resume`). So
re-running the same command after a kill continues where it stopped.

A stage is only ever taken as done for the settings it was run with: before it runs, its command,
its merged config (`--print-config`) and the weights it starts from are written to
OUT/STAGE/speedrun-settings.json; a later speedrun whose settings for a stage that holds
checkpoints differ (another task, other steps, a retrained parent) stops with a one-line error
instead of passing the old stage off as the new one. Evaluations are cached with the task, the
evaluation settings and the weights they measured, and redone when any of them differs.

    OUT/pretrain/ OUT/sft/ OUT/grpo/ OUT/distill/ OUT/student-direct/   each: metrics.jsonl, step-*/, final/
    OUT/student-init/                    the fresh student both the distilled and the direct one start from
    OUT/eval/STAGE.json                  task accuracy (greedy, with its 95% interval) and pass@k
    OUT/report.md, OUT/report.html, OUT/*.png   the report card
    OUT/speedrun.json                    merged config, seeds, versions, timings
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from daulat.errors import DaulatError
from daulat.generation import Sampling
from daulat.threads import set_threads, threads_argument


@dataclass
class SpeedrunConfig:
    """The [speedrun] section of a preset: how long each stage runs and what it works on."""

    task: str = "addition"  # the verifiable task of SFT, GRPO, distillation and evaluation
    pretrain_steps: int | None = None  # None: the preset's [train] steps
    sft_steps: int | None = None
    grpo_steps: int | None = None
    distill_steps: int | None = None  # also the steps of the student trained directly
    student_preset: str = "micro"  # the distilled student's architecture
    distill_mode: str = "fkl"  # a mode of daulat.train.distill.MODES: sft, fkl or rkl
    eval_problems: int = 100  # held-out problems per evaluation
    eval_samples: int = 8  # samples per problem for pass@k
    pass_problems: int | None = None  # the first this many held-out problems are sampled for pass@k (None: all)
    # [speedrun.eval_sampling]: how pass@k samples; its max_tokens also bounds the greedy answers
    eval_sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=128))
    # extra `section.key=value` overrides for one stage, e.g. ["grpo.max_tokens=48"]
    pretrain_overrides: list = field(default_factory=list)
    sft_overrides: list = field(default_factory=list)
    grpo_overrides: list = field(default_factory=list)
    distill_overrides: list = field(default_factory=list)
    direct_overrides: list = field(default_factory=list)  # the student trained directly (sft.* and train.*)

    def __post_init__(self):
        from daulat.train.distill import MODES

        if self.distill_mode not in MODES:
            raise ValueError(f"config field 'distill_mode' = {self.distill_mode!r}: expected one of {', '.join(MODES)}")
        if self.eval_sampling.top_k:
            raise ValueError("config field 'eval_sampling.top_k' is not used by the evaluation: leave it 0")
        for name in ("eval_problems", "eval_samples", "pass_problems"):
            if (getattr(self, name) or 1) < 1:
                raise ValueError(f"config field {name!r} must be at least 1")


DIRECT = "student-direct"  # the student architecture trained on the task's own solutions, without a teacher
STAGES = ["pretrain", "sft", "grpo", "distill", DIRECT]
SETTINGS_FILE = "speedrun-settings.json"
STUDENT_INIT = "student-init"


def add_arguments(p):
    from daulat.config import preset_names

    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(preset_names())} (default: %(default)s)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="your files and folders (default: the built-in corpus)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")
    p.add_argument("--threads", type=threads_argument, default="auto", metavar="N|auto",
                   help="torch CPU threads of every stage and evaluation (default: auto, the cores not busy when "
                        "each stage starts: measured fastest, see daulat.threads)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file merged over the preset")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="e.g. speedrun.task=sorting or train.lr=1e-3 (passed to every stage)")


# ------------------------------------------------------------------------------------------------
# The stages' command lines and the settings each one was run with
# ------------------------------------------------------------------------------------------------


def _stage(argv: list[str]) -> None:
    """Run one stage command in this process; a non-zero exit stops the speedrun."""
    from daulat.cli import main

    print(f"\n== daulat {' '.join(argv)}", flush=True)
    code = main(argv)
    if code:
        raise DaulatError(f"stage `daulat {argv[0]}` failed (exit code {code})")


def _printed_config(argv: list[str]) -> str:
    """The merged config a stage command would run with (its `--print-config` output, TOML)."""
    import contextlib
    import io

    from daulat.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main([*argv, "--print-config"])
    if code:
        raise DaulatError(f"stage `daulat {argv[0]}`: its config does not resolve (exit code {code})")
    return buffer.getvalue()


def weights_sha256(ckpt: Path) -> str:
    """sha256 over a checkpoint's safetensors files: what its weights are, whatever its record says."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(Path(ckpt).glob("*.safetensors")):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _has_checkpoint(stage_out: Path) -> bool:
    from daulat.train.loop import latest_checkpoint

    return (stage_out / "final").is_dir() or (stage_out.is_dir() and latest_checkpoint(stage_out) is not None)


def _first_difference(old: dict, new: dict) -> str:
    """What differs first between two settings, in words: a config line (with its section), the
    weights a stage starts from, or the command."""
    def lines(config: str) -> list[tuple[str, str]]:
        section, out = "", []
        for line in config.splitlines():
            section = line if line.startswith("[") else section
            if line.strip() and not line.startswith("["):
                out.append((section, line.strip()))
        return out

    a, b = lines(old.get("config", "")), lines(new.get("config", ""))
    for (sa, la), (sb, lb) in zip(a, b):
        if (sa, la) != (sb, lb):
            return f"{sa} {la}, now {sb} {lb}"
    if len(a) != len(b):
        return f"{len(a)} config lines, now {len(b)}"
    for path, sha in new.get("inputs", {}).items():
        if old.get("inputs", {}).get(path) != sha:
            return f"other weights in {path} than it started from"
    return f"the command `daulat {' '.join(old.get('command', []))}`, now `daulat {' '.join(new.get('command', []))}`"


def check_settings(name: str, stage_out: Path, settings: dict) -> None:
    """Refuse to take a stage holding checkpoints as done (or to resume it) with other settings than it
    was run with; record the settings of a stage about to start."""
    from daulat.checkpoint import write_json

    file = stage_out / SETTINGS_FILE
    if _has_checkpoint(stage_out):
        if not file.is_file():
            raise DaulatError(f"{stage_out} holds checkpoints but no {SETTINGS_FILE}: its settings are unknown; "
                              f"choose another --out")
        old = json.loads(file.read_text(encoding="utf-8"))
        if old != settings:
            raise DaulatError(f"{stage_out} was run with other settings (was {_first_difference(old, settings)}): choose "
                              f"another --out, or delete {stage_out} and the stages after it")
        return
    stage_out.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    write_json(tmp, settings)
    tmp.replace(file)


def _settings(argv: list[str], inputs: list[Path], out: Path) -> dict:
    """What a stage is run with: its command (OUT for the run directory, so that a moved run still
    resumes), its merged config, and the weights it starts from."""
    def relative(text: str) -> str:
        return text.replace(str(out), "OUT")

    return {"command": [relative(a) for a in argv], "config": relative(_printed_config(argv)),
            "inputs": {relative(str(p)): weights_sha256(p) for p in inputs}}


def _plan(args, sr: SpeedrunConfig, out: Path) -> dict[str, tuple[list[str], list[Path]]]:
    """The command line of each stage, as a user would type it, and the checkpoints it starts from."""
    common = ["--preset", args.preset, "--seed", str(args.seed)] + (["--config", args.config] if args.config else [])
    stage_overrides = [o for o in args.overrides if not o.startswith("speedrun.")]

    def steps(n):
        return ["--steps", str(n)] if n is not None else []

    def init(stage):
        return out / stage / "final"

    # the built-in corpus leans towards the run's task; the user's own files are read as they are
    data = ["--data", *args.data] if args.data else [f"data.builtin_task={sr.task}"]
    plan = {
        "pretrain": (["pretrain", "--out", str(out / "pretrain"), *common, *steps(sr.pretrain_steps), *data], []),
        "sft": (["sft", "--init", str(init("pretrain")), "--task", sr.task, "--out", str(out / "sft"), *common,
                 *steps(sr.sft_steps)], [init("pretrain")]),
        "grpo": (["grpo", "--init", str(init("sft")), "--task", sr.task, "--out", str(out / "grpo"), *common,
                  *steps(sr.grpo_steps)], [init("sft")]),
        "distill": (["distill", "--teacher", str(init("grpo")), "--task", sr.task, "--mode", sr.distill_mode,
                     "--out", str(out / "distill"), "--preset", sr.student_preset, "--seed", str(args.seed),
                     *(["--config", args.config] if args.config else []), *steps(sr.distill_steps)], [init("grpo")]),
    }
    for name in plan:
        plan[name][0].extend(stage_overrides + getattr(sr, f"{name}_overrides"))
    return plan


def _direct_plan(args, sr: SpeedrunConfig, out: Path, distill_argv: list[str]) -> tuple[list[str], list[Path]]:
    """The student trained directly: SFT of the fresh student on the task's worked solutions, with the
    distillation's optimizer settings (steps, batch, sequence length, learning rate and schedule) and
    as many training problems as the distillation has prompts."""
    import tomllib

    distill = tomllib.loads(_printed_config(distill_argv))
    train = [f"train.{k}={json.dumps(v)}" for k, v in distill["train"].items()]
    sft = [f"sft.task_examples={distill['distill']['prompts']}"]
    sft += [f"sft.{k}={json.dumps(distill['distill'][k])}" for k in ("difficulty", "system") if k in distill["distill"]]
    argv = ["sft", "--init", str(out / STUDENT_INIT), "--task", sr.task, "--out", str(out / DIRECT),
            "--preset", sr.student_preset, "--seed", str(args.seed),
            *(["--config", args.config] if args.config else []), *train, *sft, *sr.direct_overrides]
    return argv, [out / STUDENT_INIT]


def fresh_student(path: Path, teacher: Path, distill_argv: list[str], seed: int) -> None:
    """The student before any training, exactly as `daulat distill --preset` builds a random one (the
    student preset's [model] with the teacher's tokenizer, seeded by --seed), written as a checkpoint whose
    record says it learnt nothing from anyone: the start of the student trained directly."""
    import dataclasses
    import tomllib

    import torch

    from daulat.architectures import ModelSection, build_model
    from daulat.checkpoint import save_model
    from daulat.config import build_section
    from daulat.provenance import stage_info
    from daulat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(teacher)
    printed = tomllib.loads(_printed_config(distill_argv))
    # as many embedding rows as the distilled student: a pruned one keeps the teacher's, a random one the tokenizer's
    pruned = printed.get("distill", {}).get("student_init") == "pruned"
    vocab_size = json.loads((teacher / "config.json").read_text())["vocab_size"] if pruned else tokenizer.vocab_size
    config = dataclasses.replace(build_section("model", ModelSection, printed["model"]), vocab_size=vocab_size)
    if path.is_dir():
        made = json.loads((path / "daulat.json").read_text(encoding="utf-8"))
        if made.get("config", {}).get("model") != dataclasses.asdict(config) or made.get("seed") != seed:
            raise DaulatError(f"{path} holds a student of another shape or seed: choose another --out, or delete "
                              f"{path} and the student trained directly")
        return
    torch.manual_seed(seed)
    model = build_model(config)
    info = stage_info("init", method="random initialisation (no pretraining, no teacher)",
                      config={"model": dataclasses.asdict(config)}, data={"none": "random weights: no data"},
                      compute={}, metrics={}, parent=None, tokenizer_sha256=tokenizer.sha256, seed=seed)
    save_model(model, path, tokenizer=tokenizer, info=info)


def _resume_flag(out: Path) -> list[str]:
    from daulat.train.loop import latest_checkpoint

    return ["--resume"] if out.is_dir() and latest_checkpoint(out) is not None else []


def _run_stages(args, sr: SpeedrunConfig, out: Path) -> dict[str, float]:
    """Every stage in order (a finished one with the same settings is skipped); seconds of each run."""
    plan = _plan(args, sr, out)
    timings = {}
    for name in STAGES:
        stage_out = out / name
        if name == DIRECT:
            fresh_student(out / STUDENT_INIT, out / "grpo" / "final", plan["distill"][0], args.seed)
            plan[DIRECT] = _direct_plan(args, sr, out, plan["distill"][0])
        argv, inputs = plan[name]
        check_settings(name, stage_out, _settings(argv, inputs, out))
        if (stage_out / "final").is_dir():
            print(f"== {name}: done already, with the same settings ({stage_out / 'final'})", flush=True)
            continue
        t0, c0 = time.time(), time.process_time()
        _stage(argv + _resume_flag(stage_out))
        timings[name] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
    return timings


# ------------------------------------------------------------------------------------------------
# Evaluation: cached with what it measured
# ------------------------------------------------------------------------------------------------


def _eval_settings(ckpt: Path, sr: SpeedrunConfig, seed: int) -> dict:
    return {"task": sr.task, "problems": sr.eval_problems, "samples": sr.eval_samples, "pass_problems": sr.pass_problems,
            "sampling": sr.eval_sampling.to_dict(), "seed": seed, "weights_sha256": weights_sha256(ckpt)}


def evaluate_stage(ckpt: Path, sr: SpeedrunConfig, seed: int, file: Path) -> dict:
    """Greedy accuracy (with its 95% Wilson interval) and pass@k of a checkpoint on the task's held-out
    split; cached in `file` together with the task, the settings and the weights it measured, and
    recomputed when any of them differs. The result also goes into the checkpoint's card."""
    from daulat.checkpoint import load_checkpoint, write_json
    from daulat.data.tasks import get_task
    from daulat.eval import evaluate_task
    from daulat.report import wilson_interval

    settings = _eval_settings(ckpt, sr, seed)
    if file.is_file():
        cached = json.loads(file.read_text())
        if cached.get("settings") == settings:
            return cached
    model, tokenizer, info = load_checkpoint(ckpt)
    sampling, task = sr.eval_sampling, get_task(sr.task)
    sampled_n = min(sr.pass_problems or sr.eval_problems, sr.eval_problems)
    result = evaluate_task(model, tokenizer, task, n=sr.eval_problems, samples=0, max_tokens=sampling.max_tokens,
                           seed=seed)
    sampled = evaluate_task(model, tokenizer, task, n=sampled_n, samples=sr.eval_samples, greedy=False,
                            temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                            seed=seed)
    result.update({k: v for k, v in sampled.items() if k not in result}, pass_problems=sampled_n,
                  seconds=round(result["seconds"] + sampled["seconds"], 2))
    result = {k: v for k, v in result.items() if isinstance(v, (int, float, str, dict, list))}
    result["correct"] = round(result["accuracy"] * result["problems"])
    result["accuracy_ci95"] = list(wilson_interval(result["correct"], result["problems"]))
    result["parameters"] = model.num_parameters()
    result["settings"] = settings
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    write_json(tmp, result)
    tmp.replace(file)
    record_evaluation(ckpt, model, info, result)
    return result


def record_evaluation(ckpt: Path, model, info: dict, result: dict) -> None:
    """The evaluation into the checkpoint's record (daulat.json `evaluation`) and its card (README.md
    gains an Evaluation section), each file replaced atomically."""
    from daulat.checkpoint import write_json
    from daulat.report import evaluation_section, model_card

    info = dict(info, evaluation={k: result[k] for k in ("task", "problems", "accuracy", "accuracy_ci95", "pass@k",
                                                          "samples", "temperature") if k in result})
    tmp = ckpt / "daulat.json.tmp"
    write_json(tmp, info)
    tmp.replace(ckpt / "daulat.json")
    card = model_card(model, info).rstrip("\n") + "\n\n" + evaluation_section(info["evaluation"])
    tmp = ckpt / "README.md.tmp"
    tmp.write_text(card, encoding="utf-8")
    tmp.replace(ckpt / "README.md")


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def _apply_threads(args) -> list[str]:
    """torch threads for this process (the evaluations), and the `train.threads` override that gives
    the stages the same setting (`auto` is resolved by each stage as it starts)."""
    set_threads(args.threads)
    return [f"train.threads={json.dumps(args.threads)}"]


def _student_start(ckpt: Path) -> str:
    """How the distilled student began, in words, from its record."""
    init = json.loads((ckpt / "daulat.json").read_text(encoding="utf-8")).get("init")
    if isinstance(init, dict) and "pruned from the teacher to" in init:
        return (f"the teacher pruned to {init['pruned from the teacher to']} (layers {init['layers']} kept; "
                f"calibration loss {init['teacher_loss']} -> {init['student_loss']})")
    return "random weights" if init is None or str(init).startswith("fresh") else f"the checkpoint {init}"


def run(args) -> int:
    from daulat import __version__
    from daulat.config import load_config, to_dict
    from daulat.provenance import environment
    from daulat.report import write_speedrun_report

    cfg = load_config({"speedrun": SpeedrunConfig}, preset=args.preset, path=args.config,
                      overrides=[o for o in args.overrides if o.startswith("speedrun.")])
    sr: SpeedrunConfig = cfg["speedrun"]
    args.overrides = [*_apply_threads(args), *args.overrides]  # only [speedrun] is read here; the rest go to the stages
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timings = _run_stages(args, sr, out)
    evaluations, eval_times = {}, {}
    for name in STAGES:
        t0, c0 = time.time(), time.process_time()
        evaluations[name] = evaluate_stage(out / name / "final", sr, args.seed, out / "eval" / f"{name}.json")
        eval_times[name] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
    summary = {
        "preset": args.preset, "seed": args.seed, "task": sr.task, "data": args.data or "built-in corpus",
        "config": to_dict(cfg), "overrides": args.overrides, "threads": args.threads, "daulat": __version__,
        "environment": environment(), "stage_times_this_invocation": timings, "eval_times_this_invocation": eval_times,
        "wall_time_s_this_invocation": round(time.time() - started, 1),
    }
    (out / "speedrun.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    write_speedrun_report(out, {name: out / name for name in STAGES}, evaluations,
                          title=f"daulat speedrun: {args.preset}",
                          about={"preset": args.preset, "task": sr.task, "seed": args.seed,
                                 "distillation mode": sr.distill_mode, "student preset": sr.student_preset,
                                 "the distilled student started from": _student_start(out / "distill" / "final")})
    print(f"\nreport: {out / 'report.md'} (and report.html)")
    print(f"chat with the model:   daulat chat {out / 'grpo' / 'final'}")
    print(f"serve it:              daulat serve {out / 'grpo' / 'final'}   (web chat at http://127.0.0.1:8000/)")
    print(f"the small student:     daulat chat {out / 'distill' / 'final'}")
    return 0
