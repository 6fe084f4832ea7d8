"""What every training stage command shares: its flags, its config, its output directory.

    daulat <stage> --out DIR [--preset NAME] [--config FILE.toml] [--steps N] [--save-every N] [--seed S]
                   [--resume] [--print-config] [section.key=value ...]

A stage module calls `add_common_arguments(parser)` in its `add_arguments`, then in `run(args)`:
`config = load_stage_config(SCHEMA, args)` (preset < file < overrides < the shortcut flags) and
`out = prepare_output(args.out, args.resume)` once its inputs are known to be good, so that bad input
leaves nothing behind.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from daulat.config import load_config, preset_names
from daulat.errors import DaulatError

_OVERRIDE = re.compile(r"^([A-Za-z_]\w*)\.[A-Za-z_]\w*=")


def add_common_arguments(parser, default_preset: str = "tiny") -> None:
    parser.add_argument("--preset", default=default_preset,
                        help=f"recipe from daulat/recipes/ ({', '.join(preset_names())}; default: %(default)s)")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file merged over the preset")
    parser.add_argument("--steps", type=int, metavar="N", help="optimizer steps (train.steps)")
    parser.add_argument("--save-every", type=int, metavar="N", help="steps between checkpoints (train.save_every; 0: only at the end)")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of initialisation and data order (train.seed)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--print-config", action="store_true", help="print the merged config as TOML and exit")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides, e.g. train.lr=1e-3")


def split_overrides(values: list[str] | None, schema: dict) -> tuple[list[str], list[str]]:
    """(other values, overrides): `--data a b train.lr=1e-3` lets argparse swallow the override into
    --data; anything shaped `section.key=value` with a section of `schema` is taken back out."""
    rest, overrides = [], []
    for value in values or []:
        m = _OVERRIDE.match(value)
        (overrides if m and m[1] in schema else rest).append(value)
    return rest, overrides


def load_stage_config(schema: dict[str, type], args, extra_overrides: list[str] = ()) -> dict:
    """The merged config of a stage command: preset < --config file < overrides < --steps/--save-every/--seed."""
    overrides = list(extra_overrides) + list(args.overrides or [])
    for flag, key in (("steps", "train.steps"), ("save_every", "train.save_every"), ("seed", "train.seed")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(schema, preset=args.preset, path=args.config, overrides=overrides)


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
