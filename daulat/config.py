"""The one config loader: a preset from recipes/, then a TOML file, then `section.key=value` overrides.

A config is a dict of sections, each a dataclass: `{"model": ModelConfig, "train": TrainConfig, ...}`.
The caller names the sections it understands (its `schema`); an unknown section or key, or a value
of the wrong type, is a DaulatError naming it. Presets are TOML files shipped in daulat/recipes/.

A field whose type is itself a dataclass is a sub-table: `[grpo.sampling]` in TOML,
`grpo.sampling.temperature=0.7` as an override. An override is text (`section.key=value`, the value
read as TOML) or a pair `("section.key", value)` with a Python value (None included): the latter is
how command-line flags and tests pass plain values, validated like everything else.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path

from daulat.errors import DaulatError

RECIPES = Path(__file__).parent / "recipes"


def preset_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.toml"))


def read_toml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DaulatError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DaulatError(f"{path}: malformed TOML ({e})") from None


def read_preset(name: str, _seen: tuple[str, ...] = ()) -> dict:
    """A preset of recipes/. One with `base = "other"` is that preset with the tables it writes put in
    place of the base's, whole: tiny-v4's [model] is all of V4's fields, not V3's with V4's on top."""
    file = RECIPES / f"{name}.toml"
    if not file.is_file():
        raise DaulatError(f"unknown preset {name!r} (known: {', '.join(preset_names())})")
    raw = read_toml(file)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or base in _seen + (name,):
        raise DaulatError(f"preset {name!r}: base = {base!r} must name another preset, without a cycle")
    return {**read_preset(base, _seen + (name,)), **raw}


def parse_override(override) -> tuple[str, str, object]:
    """'train.lr=3e-4' -> ('train', 'lr', 0.0003); ('sft.task', None) -> ('sft', 'task', None).
    Text values are TOML; bare words are strings. The key may name a sub-table's field: 'a.b.c'."""
    if isinstance(override, tuple):
        key, value = override
    else:
        if "=" not in override or "." not in override.split("=", 1)[0]:
            raise DaulatError(f"override {override!r}: expected section.key=value, e.g. train.lr=3e-4")
        key, raw = override.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
    section, name = key.strip().split(".", 1)
    return section, name, value


def nested(name: str, value) -> dict:
    """'sampling.top_p', 0.9 -> {"sampling": {"top_p": 0.9}}: a dotted key as nested tables."""
    head, _, rest = name.partition(".")
    return {head: nested(rest, value) if rest else value}


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict):
            target[key] = dict(target[key]) if isinstance(target.get(key), dict) else {}
            _deep_update(target[key], value)
        else:
            target[key] = value


def merge(base: dict, update: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in update.items():
        if not isinstance(values, dict):
            raise DaulatError(f"config: top-level key {section!r} must be a [section]")
        _deep_update(out.setdefault(section, {}), values)
    return out


def _check_type(section: str, name: str, value, annotation) -> object:
    """Accept value if it fits the field's annotation (ints widen to floats); else a DaulatError."""
    hint = annotation
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, dict, list) and isinstance(value, base):
            return value
        if base is typing.Any:
            return value
    raise DaulatError(f"config {section}.{name} = {value!r}: expected {_in_words(annotation)}")


def _in_words(annotation) -> str:
    """'a number', 'an integer or unset'...: a field's type as a user reads it, not Python's repr."""
    words = {float: "a number", int: "an integer", str: "a string", bool: "true or false",
             dict: "a table", list: "a list", type(None): "unset"}
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return " or ".join(words.get(typing.get_origin(o) or o, getattr(o, "__name__", str(o))) for o in options)


# keys that moved to another section (a recipe that still has the old one is told where)
MOVED = {"model.bias_update_speed": "train.bias_update_speed"}


def build_section(section: str, cls, values: dict):
    """values (a TOML table) -> cls(**values), type-checked; a dataclass-typed field is a sub-table.
    A schema entry with a `choose(section, values) -> (dataclass, values)` is a family of sections
    whose table names its member (daulat.architectures.ModelSection: [model] model_type)."""
    if hasattr(cls, "choose"):
        cls, values = cls.choose(section, values)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if f"{section}.{name}" in MOVED:
            raise DaulatError(f"config: {section}.{name} is now {MOVED[f'{section}.{name}']}")
        if name not in fields:
            raise DaulatError(f"config: unknown key {section}.{name} (known: {', '.join(sorted(fields))})")
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise DaulatError(f"config {section}.{name} = {value!r}: expected a table of {section}.{name}.* keys")
            # the table's keys go over the field's own default (e.g. a teacher's lower temperature)
            f = fields[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            base = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}
            kwargs[name] = build_section(f"{section}.{name}", hints[name], {**base, **value})
        else:
            kwargs[name] = _check_type(section, name, value, hints[name])
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise DaulatError(f"config [{section}]: {e}") from None


def load_config(schema: dict[str, type], preset: str | None = None, path=None,
                overrides=(), base: dict | None = None) -> dict:
    """Merge base < preset < file < overrides and build each section's dataclass.

    Sections of a preset or file that this command does not know (e.g. [grpo] while pretraining)
    are ignored; unknown sections in overrides, and unknown keys anywhere, are errors.
    """
    raw = dict(base or {})
    if preset:
        raw = merge(raw, read_preset(preset))
    if path:
        raw = merge(raw, read_toml(path))
    for override in overrides:
        section, name, value = parse_override(override)
        if section not in schema:
            raise DaulatError(f"override {override!r}: unknown section {section!r} (known: {', '.join(schema)})")
        raw = merge(raw, {section: nested(name, value)})
    return {section: build_section(section, cls, raw.get(section, {})) for section, cls in schema.items()}


# What a post-training stage takes from a recipe's [train] (written for pretraining): the machine and the
# run's mechanics, never its optimisation (a pretraining learning rate would wreck a fine-tune).
MACHINE_KEYS = ("device", "dtype", "compile", "tensorboard", "keep_last", "seed")


def stage_config(schema: dict[str, type], stage: str, *, preset: str | None = None, path=None, overrides=(),
                 train_defaults: dict | None = None) -> dict:
    """The merged config of the training stage `stage`: the one entry point of every stage, whether
    from the command line (whose flags arrive as overrides) or from Python with plain values.

    train_defaults None (pretraining): preset < file < overrides, the sections as written.
    train_defaults a dict (a post-training stage): `train_defaults` < the preset's [train] machine keys
    (MACHINE_KEYS) < the preset's [STAGE.train] and [STAGE] < the file's [train], [STAGE.train] and
    [STAGE] < overrides.
    """
    if train_defaults is None:
        return load_config(schema, preset=preset, path=path, overrides=overrides)
    base = {"train": dict(train_defaults)}
    layers = ([(read_preset(preset), True)] if preset else []) + ([(read_toml(path), False)] if path else [])
    for raw, is_preset in layers:
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items() if k in schema}
        stage_train = raw.get(stage, {}).pop("train", {})
        if not isinstance(stage_train, dict):
            raise DaulatError(f"config: [{stage}.train] must be a table of train.* keys")
        if is_preset and "train" in raw:
            raw["train"] = {k: v for k, v in raw["train"].items() if k in MACHINE_KEYS}
        base = merge(merge(base, raw), {"train": stage_train})
    return load_config(schema, overrides=overrides, base=base)


def to_dict(config: dict) -> dict:
    """The merged config as plain JSON/TOML-able data (for --print-config and daulat.json). A section
    chosen from a family says which member it is (its class's `model_type`), so it reads back the same."""
    return {section: ({"model_type": type(value).model_type} if hasattr(type(value), "model_type") else {})
            | dataclasses.asdict(value) for section, value in config.items()}


def to_toml(config: dict) -> str:
    lines = []
    for section, value in config.items():
        lines += _toml_table(section, value)
    return "\n".join(lines)


def _toml_table(name: str, section) -> list[str]:
    """[name] with the section's plain keys, then a [name.field] table for each dataclass field."""
    lines, tables = [f"[{name}]"], []
    if hasattr(type(section), "model_type"):  # the member of a family of sections (see `to_dict`)
        lines.append(f"model_type = {_toml_value(type(section).model_type)}")
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            tables += _toml_table(f"{name}.{f.name}", value)
        elif value is None:
            lines.append(f"# {f.name} = (unset)")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    return lines + [""] + tables


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return _toml_value(str(value))
