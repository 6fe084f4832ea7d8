"""`daulat init --preset NAME --out DIR`: write a freshly initialised checkpoint (random weights)."""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("--preset", default="micro", help="architecture preset from recipes/ (default: micro)")
    p.add_argument("--config", help="TOML file whose [model] section overrides the preset")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE", help="e.g. model.num_hidden_layers=6")


def run(args) -> int:
    import torch

    from daulat.architectures import ModelSection, build_model
    from daulat.config import load_config, to_dict
    from daulat.report import save_documented

    config = load_config({"model": ModelSection}, preset=args.preset, path=args.config, overrides=args.overrides)
    torch.manual_seed(args.seed)
    model = build_model(config["model"])
    info = {"stage": "init", "preset": args.preset, "seed": args.seed, "config": to_dict(config)}
    save_documented(model, args.out, info=info)
    print(f"wrote {args.out} ({model.num_parameters():,} parameters)")
    return 0
