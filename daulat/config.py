"""The one config loader: a preset from recipes/, then a TOML file, then `section.key=value` overrides.

A config is a dict of sections, each a dataclass: `{"model": ModelConfig, "train": TrainConfig, ...}`.
The caller names the sections it understands (its `schema`); an unknown section or key, or a value
of the wrong type, is a DaulatError naming it. Presets are TOML files shipped in daulat/recipes/.
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


def read_preset(name: str) -> dict:
    file = RECIPES / f"{name}.toml"
    if not file.is_file():
        raise DaulatError(f"unknown preset {name!r} (known: {', '.join(preset_names())})")
    return read_toml(file)


def parse_override(text: str) -> tuple[str, str, object]:
    """'train.lr=3e-4' -> ('train', 'lr', 0.0003). Values are TOML; bare words are strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise DaulatError(f"override {text!r}: expected section.key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, name, value


def merge(base: dict, update: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in update.items():
        if not isinstance(values, dict):
            raise DaulatError(f"config: top-level key {section!r} must be a [section]")
        out.setdefault(section, {}).update(values)
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


def build_section(section: str, cls, values: dict):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in known:
            raise DaulatError(f"config: unknown key {section}.{name} (known: {', '.join(sorted(known))})")
        kwargs[name] = _check_type(section, name, value, hints[name])
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise DaulatError(f"config [{section}]: {e}") from None


def load_config(schema: dict[str, type], preset: str | None = None, path=None,
                overrides: list[str] = (), base: dict | None = None) -> dict:
    """Merge base < preset < file < overrides and build each section's dataclass.

    Sections of a preset or file that this command does not know (e.g. [grpo] while pretraining)
    are ignored; unknown sections in overrides, and unknown keys anywhere, are errors.
    """
    raw = dict(base or {})
    if preset:
        raw = merge(raw, read_preset(preset))
    if path:
        raw = merge(raw, read_toml(path))
    for text in overrides:
        section, name, value = parse_override(text)
        if section not in schema:
            raise DaulatError(f"override {text!r}: unknown section {section!r} (known: {', '.join(schema)})")
        raw = merge(raw, {section: {name: value}})
    return {section: build_section(section, cls, raw.get(section, {})) for section, cls in schema.items()}


def to_dict(config: dict) -> dict:
    """The merged config as plain JSON/TOML-able data (for --print-config and daulat.json)."""
    return {section: dataclasses.asdict(value) for section, value in config.items()}


def to_toml(config: dict) -> str:
    lines = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


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
