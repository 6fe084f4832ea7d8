"""What every training stage command shares on the command line: its flags, and how they become config.

    daulat <stage> --out DIR [--preset NAME] [--config FILE.toml] [--steps N] [--save-every N] [--seed S]
                   [--resume] [--print-config] [section.key=value ...]

A stage module calls `add_common_arguments(parser)` in its `add_arguments`, and its `run(args)` is
`run_command(STAGE, args, flags, start)`: the flags become `section.key` overrides (`--steps 5` is
`train.steps=5`, `--task addition` is `sft.task="addition"`), merged by `daulat.config.stage_config`
before anything is validated, so nothing is patched afterwards and Python callers (tests, benches)
pass the same plain values without any argparse object.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from daulat.config import preset_names
from daulat.errors import DaulatError
from daulat.threads import threads_argument

_OVERRIDE = re.compile(r"^([A-Za-z_]\w*)\.[A-Za-z_][\w.]*=")

# the flags every stage has, and the config key each one sets
COMMON_FLAGS = {"steps": "train.steps", "save_every": "train.save_every", "seed": "train.seed", "threads": "train.threads"}
FLAG = object()  # in a flag table: "the flag's own value"
TASK_HELP = "a built-in task (see `daulat tasks`), a .jsonl task file, or module:name (a Python module that registers the task)"


def add_common_arguments(parser, default_preset: str | None = "tiny", lora: bool = False) -> None:
    """The flags every stage has; lora=True adds --lora-rank, --lora-alpha, --lora-targets."""
    if lora:
        add_lora_arguments(parser)
    parser.add_argument("--preset", default=default_preset,
                        help=f"recipe from daulat/recipes/ ({', '.join(preset_names())}; default: %(default)s)")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file merged over the preset")
    parser.add_argument("--steps", type=int, metavar="N", help="optimizer steps (train.steps)")
    parser.add_argument("--save-every", type=int, metavar="N", help="steps between checkpoints (train.save_every; 0: only at the end)")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of initialisation and data order (train.seed)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--threads", type=threads_argument, metavar="N|auto",
                        help="torch CPU threads (train.threads; default auto: the cores not busy, see daulat.threads)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config as TOML and exit")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides, e.g. train.lr=1e-3")


# the LoRA flags of the stages that adapt a checkpoint (sft, grpo, distill), over their [lora] section
LORA_FLAGS = {"lora_rank": "lora.rank", "lora_alpha": "lora.alpha", "lora_targets": "lora.targets",
              "lora_base_dtype": "lora.base_dtype"}


def add_lora_arguments(parser) -> None:
    """--lora-rank, --lora-alpha, --lora-targets, --lora-base-dtype: the [lora] section (daulat.lora.LoraConfig) as flags."""
    parser.add_argument("--lora-rank", type=int, metavar="R", help="train LoRA adapters of rank R on the frozen "
                        "checkpoint instead of all its weights (lora.rank); OUT/final is then a PEFT adapter directory")
    parser.add_argument("--lora-alpha", type=float, metavar="A", help="scale the update by A / R (lora.alpha; default 2R)")
    parser.add_argument("--lora-targets", type=_names, metavar="NAME,...",
                        help="layers to adapt, e.g. q_proj,o_proj (lora.targets; default: attention and dense/shared MLPs)")
    parser.add_argument("--lora-base-dtype", choices=["float32", "bfloat16", "fp8"],
                        help="hold the frozen base in this dtype (lora.base_dtype; default float32); fp8: its linear "
                        "layers and experts stay one byte per weight (an FP8 checkpoint as published)")


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def split_overrides(values: list[str] | None, schema) -> tuple[list[str], list[str]]:
    """(other values, overrides): `--data a b train.lr=1e-3` lets argparse swallow the override into
    --data; anything shaped `section.key=value` with a section of `schema` is taken back out."""
    rest, overrides = [], []
    for value in values or []:
        m = _OVERRIDE.match(value)
        (overrides if m and m[1] in schema else rest).append(value)
    return rest, overrides


def flag_overrides(args, flags: dict[str, dict[str, object] | str]) -> list[tuple[str, object]]:
    """The overrides a command's flags stand for, after its `section.key=value` ones (flags win).

    flags: flag name -> the key it sets, or -> {key: value or FLAG} when one flag sets several keys
    (`--data` sets sft.data and clears sft.task: FLAG is the flag's value).
    """
    out = []
    for flag, target in {**COMMON_FLAGS, **LORA_FLAGS, **flags}.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        targets = {target: FLAG} if isinstance(target, str) else target
        out += [(key, value if v is FLAG else v) for key, v in targets.items()]
    return out


def run_command(stage, args, flags: dict, start: Callable[[dict], object], extra_overrides=()) -> int:
    """A stage command: its config from --preset, --config, the overrides and the flags; printed with
    --print-config, else `start(config)` runs the stage."""
    from daulat.config import to_toml

    config = stage.config(preset=args.preset, path=args.config,
                          overrides=[*extra_overrides, *(args.overrides or []), *flag_overrides(args, flags)])
    if args.print_config:
        print(to_toml(config), end="")
        return 0
    start(config)
    return 0


def prepare_output(out, resume: bool) -> Path:
    """Create the output directory (or check the existing one) and refuse to train over checkpoints
    unless resuming, so that no finished work is overwritten by accident."""
    from daulat.train.loop import latest_checkpoint

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DaulatError(f"output {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DaulatError(f"cannot create output directory {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DaulatError(f"output directory {out} is not writable")
    newest = latest_checkpoint(out)
    if newest is not None and not resume:
        raise DaulatError(f"{out} already holds checkpoints (newest: {newest.name}); pass --resume to continue, "
                          f"or choose another --out")
    return out
