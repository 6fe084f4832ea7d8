"""`daulat speedrun`: from nothing to a served model in one command.

    tokenizer + pretrain -> SFT -> GRPO -> distill into a smaller student -> eval -> report

Each stage is the stage command a user would run by hand (`daulat pretrain`, `daulat sft`, ...),
writing into its own directory under OUT. A stage whose `final/` checkpoint exists is done and is
not run again; one that was interrupted continues from its newest checkpoint (`--resume`). So
re-running the same command after a kill continues where it stopped.

    OUT/pretrain/  OUT/sft/  OUT/grpo/  OUT/distill/   each: metrics.jsonl, step-*/, final/
    OUT/eval/STAGE.json                                task accuracy of each final checkpoint
    OUT/report.md, OUT/report.html, OUT/*.png           the report card
    OUT/speedrun.json                                   merged config, seeds, versions, timings
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from daulat.errors import DaulatError
from daulat.generation import Sampling


@dataclass
class SpeedrunConfig:
    """The [speedrun] section of a preset: how long each stage runs and what it works on."""

    task: str = "addition"  # the verifiable task of SFT, GRPO, distillation and evaluation
    pretrain_steps: int | None = None  # None: the preset's [train] steps
    sft_steps: int | None = None
    grpo_steps: int | None = None
    distill_steps: int | None = None
    student_preset: str = "micro"  # the distilled student's architecture
    distill_mode: str = "fkl"  # a mode of daulat.train.distill.MODES: sft, fkl or rkl
    eval_problems: int = 100  # held-out problems per evaluation
    eval_samples: int = 8  # samples per problem for pass@k
    # [speedrun.eval_sampling]: how pass@k samples; its max_tokens also bounds the greedy answers
    eval_sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=128))
    # extra `section.key=value` overrides for one stage, e.g. ["grpo.max_tokens=48"]
    pretrain_overrides: list = field(default_factory=list)
    sft_overrides: list = field(default_factory=list)
    grpo_overrides: list = field(default_factory=list)
    distill_overrides: list = field(default_factory=list)

    def __post_init__(self):
        from daulat.train.distill import MODES

        if self.distill_mode not in MODES:
            raise ValueError(f"config field 'distill_mode' = {self.distill_mode!r}: expected one of {', '.join(MODES)}")
        if self.eval_sampling.top_k:
            raise ValueError("config field 'eval_sampling.top_k' is not used by the evaluation: leave it 0")
        for name in ("eval_problems", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name!r} must be at least 1")


STAGES = ["pretrain", "sft", "grpo", "distill"]


def add_arguments(p):
    from daulat.config import preset_names

    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(preset_names())} (default: %(default)s)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="your files and folders (default: the built-in corpus)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file merged over the preset")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="e.g. speedrun.task=sorting or train.lr=1e-3 (passed to every stage)")


def _stage(argv: list[str]) -> None:
    """Run one stage command in this process; a non-zero exit stops the speedrun."""
    from daulat.cli import main

    print(f"\n== daulat {' '.join(argv)}", flush=True)
    code = main(argv)
    if code:
        raise DaulatError(f"stage `daulat {argv[0]}` failed (exit code {code})")


def _resume_flag(out: Path) -> list[str]:
    from daulat.train.loop import latest_checkpoint

    return ["--resume"] if out.is_dir() and latest_checkpoint(out) is not None else []


def _evaluate(ckpt: Path, task_name: str, cfg: SpeedrunConfig, seed: int, file: Path) -> dict:
    """Greedy accuracy and pass@k of a checkpoint on the task's held-out split (cached in `file`)."""
    if file.is_file():
        return json.loads(file.read_text())
    from daulat.checkpoint import load_checkpoint, write_json
    from daulat.data.tasks import get_task
    from daulat.eval import evaluate_task

    model, tokenizer, _ = load_checkpoint(ckpt)
    sampling = cfg.eval_sampling
    result = evaluate_task(model, tokenizer, get_task(task_name), n=cfg.eval_problems, samples=cfg.eval_samples,
                           temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                           seed=seed)
    result = {k: v for k, v in result.items() if isinstance(v, (int, float, str, dict))}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    write_json(tmp, result)
    tmp.replace(file)
    return result


def _plan(args, sr: SpeedrunConfig, out: Path) -> dict[str, list[str]]:
    """The command line of each stage, as a user would type it."""
    common = ["--preset", args.preset, "--seed", str(args.seed)] + (["--config", args.config] if args.config else [])

    def steps(n):
        return ["--steps", str(n)] if n is not None else []

    return {
        "pretrain": ["pretrain", "--out", str(out / "pretrain"), *common, *steps(sr.pretrain_steps)]
        + (["--data", *args.data] if args.data else []),
        "sft": ["sft", "--init", str(out / "pretrain" / "final"), "--task", sr.task, "--out", str(out / "sft"),
                *common, *steps(sr.sft_steps)],
        "grpo": ["grpo", "--init", str(out / "sft" / "final"), "--task", sr.task, "--out", str(out / "grpo"),
                 *common, *steps(sr.grpo_steps)],
        "distill": ["distill", "--teacher", str(out / "grpo" / "final"), "--task", sr.task, "--mode", sr.distill_mode,
                    "--out", str(out / "distill"), "--preset", sr.student_preset, "--seed", str(args.seed),
                    *(["--config", args.config] if args.config else []), *steps(sr.distill_steps)],
    }


def run(args) -> int:
    from daulat import __version__
    from daulat.config import load_config, to_dict
    from daulat.provenance import environment
    from daulat.report import write_report

    # only [speedrun] is read here; the other sections and the overrides go to every stage
    stage_overrides = [o for o in args.overrides if not o.startswith("speedrun.")]
    cfg = load_config({"speedrun": SpeedrunConfig}, preset=args.preset, path=args.config,
                      overrides=[o for o in args.overrides if o.startswith("speedrun.")])
    sr: SpeedrunConfig = cfg["speedrun"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(args, sr, out)
    started = time.time()
    timings = {}
    for name in STAGES:
        stage_out = out / name
        if (stage_out / "final").is_dir():
            print(f"== {name}: done already ({stage_out / 'final'})", flush=True)
            continue
        t0 = time.time()
        _stage(plan[name] + _resume_flag(stage_out) + stage_overrides + getattr(sr, f"{name}_overrides"))
        timings[name] = time.time() - t0

    evaluations = {}
    for name in STAGES:
        evaluations[name] = _evaluate(out / name / "final", sr.task, sr, args.seed, out / "eval" / f"{name}.json")
    summary = {
        "preset": args.preset, "seed": args.seed, "task": sr.task, "data": args.data or "built-in corpus",
        "config": to_dict(cfg), "overrides": args.overrides, "daulat": __version__,
        "environment": environment(), "stage_seconds_this_invocation": timings,
        "wall_time_s_this_invocation": time.time() - started,
    }
    (out / "speedrun.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    extra = {"preset": args.preset, "task": sr.task, "seed": args.seed,
             "teacher (grpo) vs student (distill) accuracy":
             f"{evaluations['grpo'].get('accuracy')} vs {evaluations['distill'].get('accuracy')}"}
    write_report(out, {name: out / name for name in STAGES}, evaluations, title=f"daulat speedrun: {args.preset}",
                 extra=extra)
    print(f"\nreport: {out / 'report.md'} (and report.html)")
    print(f"chat with the model:   daulat chat {out / 'grpo' / 'final'}")
    print(f"serve it:              daulat serve {out / 'grpo' / 'final'}   (web chat at http://127.0.0.1:8000/)")
    print(f"the small student:     daulat chat {out / 'distill' / 'final'}")
    return 0
