"""Checkpoints are transformers `deepseek_v3` (`deepseek_v32`, `deepseek_v4`) directories (see DESIGN.md):

    config.json  model.safetensors  generation_config.json  tokenizer files
    mtp.safetensors (daulat only)  daulat.json (how it was made)  README.md (model card)
    train_state/ (optional: optimizer, step, RNG, data cursor; safetensors + JSON)

`save_model` is the one writer: it fills a temporary directory beside the target and renames it
into place, so a kill at any moment leaves either the previous checkpoint or the new one, whole.
Only safetensors and JSON are read; nothing is unpickled.

On disk the routed experts have transformers' per-expert names
(`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, ...); in memory daulat stacks them
(`layers.{i}.mlp.gate_up_proj` [E, 2I, D], `layers.{i}.mlp.down_proj` [E, D, I]). MTP modules sit
after the main stack as `model.layers.{L + k}` exactly as in DeepSeek-V3's release, but in their own
file so that transformers and exports never see them. An architecture brings its own names (its
`Layout` in ARCHITECTURES): DeepSeek-V4's are DeepSeek's published ones (daulat/model_v4.py).

Reading treats a directory as untrusted input (daulat/weights.py): config.json and the tensor
headers are checked against each other (names, shapes, dtypes, layer and expert counts) before
anything is allocated, then tensors are read one at a time, FP8 block-scaled weights (and DeepSeek-V4's
MXFP4 experts) dequantized (daulat/quant.py), into a model built on the meta device.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

import daulat.lora as lora
import daulat.model_v32 as model_v32
import daulat.model_v4 as model_v4
from daulat.architectures import MODEL_TYPES
from daulat.errors import DaulatError
from daulat.model import DeepseekV3, ModelConfig, MoE, rope_frequencies
from daulat.quant import (RESIDENT_BLOCK, SCALE_SUFFIX, BlockFP8, dequantize, dequantize_mxfp4, has_nan_bytes,
                          make_resident, mxfp4_grid, parse_quantization, quantize, scale_grid)
from daulat.weights import (FP4_DTYPE, FP8_DTYPE, INDEX_FILE, INFO_FILE, INTEGER_DTYPES, MODEL_FILE, SCALE_DTYPES,
                            TRAIN_STATE_DIR, Checkpoint, Entry, TensorReader, check_dtype, check_finite,
                            checkpoint_dir, disk_error, fsync_dir, read_json, read_safetensors, replace_dir, scan,
                            write_json)

MTP_FILE = "mtp.safetensors"

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


# ------------------------------------------------------------------------------------------------
# Name mapping: daulat's state dict <-> transformers' checkpoint keys
# ------------------------------------------------------------------------------------------------


def to_hf_state_dict(model: DeepseekV3) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(main tensors, MTP tensors) under transformers' checkpoint names, experts split per expert."""
    L = model.config.num_hidden_layers
    main, mtp = {}, {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied to the embedding; transformers does not store it either
        target = main
        if name.startswith("mtp."):
            _, k, rest = name.split(".", 2)
            prefix = f"model.layers.{L + int(k)}."
            rest = {"norm.weight": "shared_head.norm.weight"}.get(rest, rest.removeprefix("block."))
            name, target = prefix + rest, mtp
        elif name.startswith("layers."):
            name = "model." + name
        elif name != "lm_head.weight":
            name = "model." + name
        fused = re.match(r"^(model\.layers\.\d+\.mlp)\.(gate_up_proj|down_proj)$", name)
        if fused:
            prefix, kind = fused.groups()
            if kind == "gate_up_proj":
                gate, up = tensor.chunk(2, dim=1)
                for e in range(tensor.shape[0]):
                    target[f"{prefix}.experts.{e}.gate_proj.weight"] = gate[e]
                    target[f"{prefix}.experts.{e}.up_proj.weight"] = up[e]
            else:
                for e in range(tensor.shape[0]):
                    target[f"{prefix}.experts.{e}.down_proj.weight"] = tensor[e]
            continue
        target[name] = tensor
    return {k: v.contiguous() for k, v in main.items()}, {k: v.contiguous() for k, v in mtp.items()}


def _layer_name(layer: int, rest: str, num_layers: int) -> str:
    if layer < num_layers:
        return f"layers.{layer}.{rest}"
    k = layer - num_layers  # an MTP module
    special = {"shared_head.norm.weight": "norm.weight", "enorm.weight": "enorm.weight",
               "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight"}
    if rest in special:
        return f"mtp.{k}.{special[rest]}"
    if rest.startswith(("embed_tokens", "shared_head.head")):
        return ""  # DeepSeek-V3 repeats the shared embedding and head in its MTP layer: read past
    return f"mtp.{k}.block.{rest}"


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------




def save_model(model: nn.Module, path, tokenizer=None, info: dict | None = None,
               train_state: dict | None = None, model_card: str | None = None,
               weights: dict[str, torch.Tensor] | None = None, extra_config: dict | None = None) -> Path:
    """Write `model` as a transformers directory of its architecture (`deepseek_v3`, `deepseek_v32`,
    `deepseek_v4`: its config's `to_hf_dict` names it) at `path`, atomically.

    tokenizer: saved beside the weights when given (anything with `.save(dir)`).
    info: JSON written as daulat.json (stage, config, data manifest, compute...).
    train_state: {"tensors": {name: Tensor}, "meta": JSON} written to train_state/ for exact resume.
    model_card: Markdown written as README.md. The caller renders it (daulat.report.save_documented,
        which `daulat.save_model` and the Trainer use), so that this writer knows nothing of cards.
    weights, extra_config: the main tensors under checkpoint names and keys added to config.json, when
        they are not the model's own (an FP8 export: daulat/quant.py).
    A write that fails (a full disk) is one line, and leaves any previous checkpoint at `path` whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise DaulatError(f"cannot write checkpoint: {path.parent} is not writable")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        _write_files(model, tmp, tokenizer, info, train_state, model_card, weights, extra_config)
        replace_dir(tmp, path)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DaulatError(f"cannot write checkpoint {path}: {disk_error(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_files(model, tmp: Path, tokenizer, info, train_state, model_card, weights, extra_config) -> None:
    """Every file of a checkpoint into the fresh directory `tmp`, each fsynced."""
    config = model.config
    hf_config = config.to_hf_dict()
    main, mtp = architecture(hf_config).layout.to_hf(model)
    main = {k: v.detach().cpu().contiguous() for k, v in (weights if weights is not None else main).items()}
    save_file(main, tmp / MODEL_FILE, metadata={"format": "pt"})
    if mtp:
        save_file({k: v.detach().cpu().contiguous() for k, v in mtp.items()}, tmp / MTP_FILE, metadata={"format": "pt"})
    hf_config["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    hf_config.update(extra_config or {})
    write_json(tmp / "config.json", hf_config)
    write_json(tmp / "generation_config.json", {"bos_token_id": config.bos_token_id,
                                                "eos_token_id": config.eos_token_id,
                                                "pad_token_id": config.pad_token_id})
    if tokenizer is not None:
        tokenizer.save(tmp)
    if info is not None:
        write_json(tmp / INFO_FILE, info)
    if model_card is not None:
        (tmp / "README.md").write_text(model_card, encoding="utf-8")
    if train_state is not None:
        (tmp / TRAIN_STATE_DIR).mkdir()
        tensors = {k: v.detach().cpu().contiguous() for k, v in train_state.get("tensors", {}).items()}
        save_file(tensors, tmp / TRAIN_STATE_DIR / "state.safetensors")
        write_json(tmp / TRAIN_STATE_DIR / "state.json", train_state.get("meta", {}))
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.rglob("*"):  # readable as an ordinary file of this user would be, and durable
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    os.chmod(tmp, 0o777 & ~umask)
    fsync_dir(tmp)




# ------------------------------------------------------------------------------------------------
# Reading: config.json, then the tensor headers, checked against each other, then one tensor at a time
# ------------------------------------------------------------------------------------------------

_ROPE_NUMBERS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                 "mscale_all_dim", "attention_factor", "rope_theta")


def load_config(path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (config.json checked for structure first); of its base
    for a LoRA adapter directory."""
    if lora.is_adapter_dir(path):
        path = lora.resolve_base(path)
    path = checkpoint_dir(path)
    return parse_config(read_json(path / "config.json", expect=dict), path / "config.json")


def parse_config(raw: dict, source) -> ModelConfig:
    """A config.json's ModelConfig (its architecture's subclass); a field of the wrong JSON kind is one
    line naming it."""
    config_type = architecture(raw).config
    for f in fields(config_type):
        value = raw.get(f.name)
        if f.name in ("bos_token_id", "eos_token_id") and isinstance(value, list):
            value = value[0] if value else None  # transformers allows a list of ids
        if f.name in raw and not _fits(value, f.type if isinstance(f.type, str) else f.type.__name__):
            raise DaulatError(f"{source}: field {f.name!r} = {_short(raw[f.name])}: expected {f.type}")
    for key in ("rope_parameters", "rope_scaling"):
        rope = raw.get(key)
        if rope is not None and not isinstance(rope, dict):
            raise DaulatError(f"{source}: field {key!r} must be an object, not {_short(rope)}")
        for name in _ROPE_NUMBERS:
            value = (rope or {}).get(name)
            if value is not None and not _fits(value, "float"):
                raise DaulatError(f"{source}: field '{key}.{name}' = {_short(value)}: expected a number")
    try:
        return config_type.from_hf_dict(raw)
    except (TypeError, ValueError) as e:
        raise DaulatError(f"{source}: {e}") from None


def _fits(value, annotation: str) -> bool:
    """Whether a JSON value is of a dataclass field's annotated kind ("int | None", "float", ...)."""
    kinds = {k.strip() for k in annotation.split("|")}
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return bool(kinds & {"int", "float"})
    if isinstance(value, float):
        return "float" in kinds and math.isfinite(value)
    return any(isinstance(value, kind) for name, kind in (("str", str), ("dict", dict), ("list[str]", list))
               if name in kinds)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Piece(NamedTuple):
    """A checkpoint tensor and where it goes in a daulat parameter."""

    entry: Entry
    scale: Entry | None  # its FP8 block scale, if quantized
    expert: int | None  # index along the stacked expert dimension (None: the whole parameter)
    half: int | None  # 0: the gate_proj rows of gate_up_proj, 1: the up_proj rows; None: all rows


def _target(key: str, num_layers: int) -> tuple[str, int | None, int | None] | None:
    """(daulat name, expert, half) a checkpoint key fills; None for a name that is not the model's."""
    m = _EXPERT.match(key)
    if m:
        kind = m[3]
        name = _layer_name(int(m[1]), "mlp.down_proj" if kind == "down_proj" else "mlp.gate_up_proj", num_layers)
        return name, int(m[2]), {"gate_proj": 0, "up_proj": 1, "down_proj": None}[kind]
    m = _FUSED.match(key)
    if m:
        return _layer_name(int(m[1]), f"mlp.{m[2]}", num_layers), None, None
    m = _LAYER.match(key)
    if m:
        return _layer_name(int(m[1]), m[2], num_layers), None, None
    if key == "lm_head.weight":
        return key, None, None
    if key.startswith("model."):
        return key.removeprefix("model."), None, None
    return None


def _hf_name(name: str) -> str:
    """The checkpoint key (first expert for stacked tensors) a daulat parameter is read from."""
    m = re.match(r"^layers\.(\d+)\.mlp\.(gate_up_proj|down_proj)$", name)
    if m:
        kind = "gate_proj" if m[2] == "gate_up_proj" else "down_proj"
        return f"model.layers.{m[1]}.mlp.experts.0.{kind}.weight"
    if name.startswith("layers.") or name in ("embed_tokens.weight", "norm.weight"):
        return "model." + name
    return name


def _first_gap(found: set[int]) -> int:
    """The smallest index not in `found` (without building range(n) for an n a config claims)."""
    i = 0
    while i in found:
        i += 1
    return i


def _check_counts(entries: dict[str, Entry], config, layout: Layout, source: str) -> None:
    """Layer, MTP and expert counts of config.json against the tensor names, before anything is built:
    a config that claims 10**6 layers or 10**9 experts fails here, at the cost of reading names.
    A checkpoint without MTP weights (transformers' save_pretrained drops them) loads without MTP.
    A missing layer or expert is named after a key of its neighbours (the checkpoint's own spelling)."""
    L, D, E = config.num_hidden_layers, config.num_nextn_predict_layers, config.n_routed_experts
    layers, experts, expert_key, prefix = set(), {}, {}, ""
    for key in entries:
        k = layout.mtp.match(key) if layout.mtp else None
        if k:  # V4's `mtp.{k}.*`: counted as layer L + k
            layers.add(L + int(k[1]))
            if int(k[1]) >= D:
                raise DaulatError(f"{source}: unexpected tensor {key!r} for this config.json "
                                  f"(num_nextn_predict_layers = {D})")
        m = layout.layer.match(key)
        if not m:
            continue
        layer, e = int(m[1]), layout.expert.match(key)
        if layer >= L + D or (e and int(e[2]) >= E):
            limits = f"num_hidden_layers = {L}, num_nextn_predict_layers = {D}, n_routed_experts = {E}"
            raise DaulatError(f"{source}: unexpected tensor {key!r} for this config.json ({limits})")
        layers.add(layer)
        prefix = key[: m.start(1)]  # "model.layers.", or V4's "layers."
        if e:
            experts.setdefault((layer, e[3]), set()).add(int(e[2]))
            expert_key.setdefault((layer, e[3]), e)
    if _first_gap(layers) < L:
        gap = _first_gap(layers)
        raise DaulatError(f"{source}: missing tensors of layer {gap} ('{prefix}{gap}.*'): "
                          f"config.json says num_hidden_layers = {L}")
    mtp = {layer - L for layer in layers if layer >= L}
    if not mtp:
        config.num_nextn_predict_layers = 0
    elif _first_gap(mtp) < D:
        where = f"mtp.{_first_gap(mtp)}" if layout.mtp else f"{prefix}{L + _first_gap(mtp)}"
        raise DaulatError(f"{source}: missing tensors of MTP layer '{where}.*': "
                          f"config.json says num_nextn_predict_layers = {D}")
    for (layer, kind), found in sorted(experts.items()):
        if _first_gap(found) < E:
            name = _renumber(expert_key[(layer, kind)], 2, _first_gap(found))
            raise DaulatError(f"{source}: missing tensor {name!r}: config.json says n_routed_experts = {E}")


def _renumber(match: re.Match, group: int, number: int) -> str:
    """The matched key with its `group`-th number replaced: the name of a neighbour that is absent."""
    return match.string[: match.start(group)] + str(number) + match.string[match.end(group):]


def _plan(entries: dict[str, Entry], config, quant: BlockFP8 | None, layout: Layout, source: str) -> dict:
    """The checkpoint's tensors grouped by the daulat parameter they fill, FP8 scales paired with weights."""
    plan: dict[str, list[_Piece]] = {}
    for key, entry in entries.items():
        if layout.weight_of(key) is not None or key.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):
            continue
        target = layout.target(key, config.num_hidden_layers)
        if target is None:
            raise DaulatError(f"{source}: unexpected tensor {key!r}")
        name, expert, half = target
        if name:  # "": a tensor the model reads past
            plan.setdefault(name, []).append(_Piece(entry, _scale_of(entry, entries, quant, layout), expert, half))
    for key, entry in entries.items():
        weight = layout.weight_of(key)
        if weight is not None and weight not in entries:
            raise DaulatError(f"{entry.file}: scale {key!r} has no weight {weight!r}")
    return plan


def _scale_of(entry: Entry, entries: dict[str, Entry], quant: BlockFP8 | None, layout: Layout) -> Entry | None:
    """The block scale of a float8 (or packed FP4) weight, checked against the weight's shape and the
    block size (MXFP4: one scale per 32 values of a row)."""
    scale_name = layout.scale_key(entry.name)
    scale = entries.get(scale_name)
    if entry.dtype in INTEGER_DTYPES and scale is None:
        return None  # an index table (V4's tid2eid), or a wrong dtype: _check_shapes asks which
    packed = entry.dtype == FP4_DTYPE
    if packed and scale is not None and quant is not None and quant.expert_dtype != "fp4":
        raise DaulatError(f"{entry.file}: tensor {entry.name!r} is packed FP4 (I8), but config.json's "
                          f"expert_dtype is {quant.expert_dtype!r}, not 'fp4'")
    check_dtype(entry, scaled=scale is not None and quant is not None, scale_name=scale_name,
                packed=quant is not None and quant.expert_dtype == "fp4")
    if scale is None:
        return None
    if entry.dtype != FP8_DTYPE and not packed:
        raise DaulatError(f"{scale.file}: scale {scale.name!r} belongs to {entry.name!r}, which is "
                          f"{entry.dtype}, not float8")
    if scale.dtype not in SCALE_DTYPES:
        raise DaulatError(f"{scale.file}: scale {scale.name!r} has dtype {scale.dtype}: expected F32 or F8_E8M0")
    grid = mxfp4_grid(entry.shape) if packed else scale_grid(entry.shape, quant.block)
    if scale.shape != grid:
        blocks = "two FP4 values a byte, one scale per 32 values" if packed else \
            f"blocks of {quant.block[0]}x{quant.block[1]}"
        raise DaulatError(f"{scale.file}: scale {scale.name!r} has shape {scale.shape}; weight {entry.shape} in "
                          f"{blocks} needs {grid}")
    return scale


def _check_shapes(plan: dict, expected: dict[str, torch.Tensor], hf_name: Callable, source: str) -> None:
    """Every parameter present with the shape config.json implies, integer only where the model holds an
    index table; nothing left over."""
    for name, ref in expected.items():
        pieces = plan.get(name)
        if not pieces:
            raise DaulatError(f"{source}: missing tensor {hf_name(name)!r}")
        stacked = pieces[0].expert is not None
        if stacked != all(p.expert is not None for p in pieces):
            raise DaulatError(f"{source}: {hf_name(name)!r} is stored both fused and per expert")
        want = tuple(ref.shape)
        if stacked:  # per-expert tensors: [I, D] halves of gate_up_proj, [D, I] slices of down_proj
            halves = 2 if name.endswith("gate_up_proj") else 1
            want = (want[1] // halves, *want[2:])
            if len(pieces) != ref.shape[0] * halves:  # counts were checked; a half of an expert is absent
                raise DaulatError(f"{source}: missing the gate or up projection of an expert for {hf_name(name)!r}")
        for piece in pieces:
            entry = piece.entry
            if entry.shape != _stored_shape(want, piece):
                raise DaulatError(f"{source}: tensor {entry.name!r} has shape {entry.shape}, config.json implies "
                                  f"{_stored_shape(want, piece)}" + (" (packed two FP4 values a byte)"
                                                                     if _is_packed(piece) else ""))
            if ref.is_floating_point() == (entry.dtype in INTEGER_DTYPES):
                need = "weights must be floating point" if ref.is_floating_point() else "expected an integer table"
                raise DaulatError(f"{entry.file}: tensor {entry.name!r} has dtype {entry.dtype}: {need}")
    extra = sorted(set(plan) - set(expected))
    if extra:
        raise DaulatError(f"{source}: unexpected tensor {plan[extra[0]][0].entry.name!r} for this config.json")


def _is_packed(piece: _Piece) -> bool:
    return piece.scale is not None and piece.entry.dtype == FP4_DTYPE


def _stored_shape(shape: tuple[int, ...], piece: _Piece) -> tuple[int, ...]:
    """The shape a piece of a parameter of `shape` has on disk: packed FP4 holds two columns a byte."""
    if not _is_packed(piece) or not shape:
        return shape
    return (*shape[:-1], shape[-1] // 2) if shape[-1] % 2 == 0 else (*shape[:-1], shape[-1] / 2)


def _stream(plan: dict, expected: dict[str, torch.Tensor], quant: BlockFP8 | None, device,
            dtype: torch.dtype, keep_fp32: tuple[str, ...] = ("e_score_correction_bias",),
            resident: frozenset[str] = frozenset()) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """Read every parameter's tensors one at a time, straight into `dtype` on `device`: float32 for
    names holding a `keep_fp32` fragment (the router's selection bias, V3.2's indexer head weights,
    V4's hyper-connections...), the model's own integer dtype for an index table. The names in
    `resident` are kept FP8 instead, as (weight, scale_inv) pairs: -> (state, pairs)."""
    state, pairs = {}, {}
    with TensorReader() as reader:
        for name, ref in expected.items():
            want = torch.float32 if any(k in "." + name for k in keep_fp32) else dtype
            want = want if ref.is_floating_point() else ref.dtype
            pieces = plan[name]
            if name in resident:
                pairs[name] = _read_resident(reader, pieces, ref, quant, device)
            elif pieces[0].expert is None:
                state[name] = _read(reader, pieces[0], quant, device, want)
            else:
                state[name] = _fill_experts(reader, pieces, torch.empty(ref.shape, dtype=want, device=device),
                                            quant, device)
    return state, pairs


def _fill_experts(reader: TensorReader, pieces: list[_Piece], out: torch.Tensor, quant: BlockFP8 | None,
                  device) -> torch.Tensor:
    """A stacked expert tensor [E, rows, cols] filled from per-expert pieces (halves of gate_up_proj)."""
    rows = out.shape[1] // 2
    for piece in pieces:
        slot = out[piece.expert] if piece.half is None else out[piece.expert, piece.half * rows:][:rows]
        slot.copy_(_read(reader, piece, quant, device, out.dtype))
    return out


def _read_resident(reader: TensorReader, pieces: list[_Piece], ref: torch.Tensor, quant: BlockFP8 | None,
                   device) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """One FP8-resident parameter as (float8 weight, float32 scale_inv, block): as stored where the
    checkpoint is FP8 (per-expert pieces placed into the stacked tensor and its scale grid), quantized
    in blocks of RESIDENT_BLOCK where it is not. Stacked gate and up projections whose rows are not
    whole blocks cannot share one grid: their scales are then kept one row per weight row (block
    (1, bn), exact, 4 / bn bytes per weight more)."""
    if pieces[0].scale is None:  # a bf16 / float32 checkpoint: quantized here, one tensor at a time
        if pieces[0].expert is None:
            tensor = reader.read(pieces[0].entry, torch.float32, device)
        else:
            tensor = _fill_experts(reader, pieces, torch.empty(ref.shape, dtype=torch.float32, device=device),
                                   None, device)
        check_finite(tensor, pieces[0].entry.name, pieces[0].entry.file)
        return (*quantize(tensor, RESIDENT_BLOCK), RESIDENT_BLOCK)
    if pieces[0].expert is None:
        weight = _read_fp8(reader, pieces[0], device)
        return weight, reader.read(pieces[0].scale, torch.float32, device), quant.block
    rows, (bm, bn) = ref.shape[1] // 2, quant.block
    per_row = any(p.half is not None for p in pieces) and rows % bm
    block = (1, bn) if per_row else quant.block
    weight = torch.empty(ref.shape, dtype=torch.float8_e4m3fn, device=device)
    scale = torch.empty(scale_grid(tuple(ref.shape), block), dtype=torch.float32, device=device)
    for piece in pieces:
        slot, grid = weight[piece.expert], scale[piece.expert]
        stored = reader.read(piece.scale, torch.float32, device)
        if per_row:
            stored = stored.repeat_interleave(bm, dim=0)[:rows]
        if piece.half is not None:
            step = rows // block[0]
            slot, grid = slot[piece.half * rows:][:rows], grid[piece.half * step:][:step]
        slot.copy_(_read_fp8(reader, piece, device))
        grid.copy_(stored)
    return weight, scale, block


def _read_fp8(reader: TensorReader, piece: _Piece, device) -> torch.Tensor:
    """A float8 weight as stored, refused if it holds a NaN (an FP8-resident product would not see it)."""
    weight = reader.read(piece.entry, device=device)
    if has_nan_bytes(weight):
        raise DaulatError(f"{piece.entry.file}: tensor {piece.entry.name!r} holds NaN")
    return weight


def _read(reader: TensorReader, piece: _Piece, quant: BlockFP8 | None, device, dtype) -> torch.Tensor:
    """One checkpoint tensor in `dtype` on `device`: FP8 dequantized block by block, every value finite."""
    if piece.scale is None:
        tensor = reader.read(piece.entry, dtype, device)
    else:  # the one-byte weight and its scales first, then the product in the working dtype
        weight, scale = reader.read(piece.entry, device=device), reader.read(piece.scale, device=device)
        if _is_packed(piece):
            tensor = dequantize_mxfp4(weight, scale, dtype=dtype)
        else:
            tensor = dequantize(weight, scale, quant.block, dtype=dtype)
    check_finite(tensor, piece.entry.name, piece.entry.file)
    return tensor


# ------------------------------------------------------------------------------------------------
# Architectures: what each model_type brings (config, model, names, float32 tensors)
# ------------------------------------------------------------------------------------------------


def _v3_buffers(model: DeepseekV3, device) -> None:
    """Non-persistent buffers of a model built on the meta device, made real: RoPE, expert loads."""
    model.inv_freq = rope_frequencies(model.config)[0].to(device)
    for moe in model.moe_layers():
        moe.tokens_per_expert = torch.zeros(moe.n_experts, device=device)


def _v4_to_hf(model: model_v4.DeepseekV4) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(main tensors, MTP tensors) under the published names; the MTP ones (`mtp.{k}.*`) go to mtp.safetensors."""
    main, mtp = {}, {}
    for key, tensor in model_v4.to_hf_state_dict_v4(model).items():
        (mtp if key.startswith("mtp.") else main)[key] = tensor.contiguous()
    return main, mtp


def _v4_buffers(model: model_v4.DeepseekV4, device) -> None:
    """V4's RoPE tables and load counters made real, and each hash layer's token -> expert table checked
    to name real experts (an id out of range would fail deep inside a forward, not here in one line)."""
    model.reset_buffers(device)
    for i, moe in enumerate(model.moe_layers()):
        table = moe.gate.tid2eid if moe.is_hash else None
        if table is not None and table.numel() and not 0 <= int(table.min()) <= int(table.max()) < moe.n_experts:
            raise DaulatError(f"tensor {model_v4.checkpoint_key_v4(f'layers.{i}.mlp.gate.tid2eid')!r} holds "
                              f"expert ids outside 0..{moe.n_experts - 1}")


def _v4_target(key: str, num_layers: int) -> tuple[str, int | None, int | None]:
    return model_v4.checkpoint_target_v4(key)


def _v3_scale_key(weight: str) -> str:
    return weight + SCALE_SUFFIX  # "x.weight" -> "x.weight_scale_inv"


def _v3_weight_of(key: str) -> str | None:
    return key.removesuffix(SCALE_SUFFIX) if key.endswith(SCALE_SUFFIX) else None


def _v4_scale_key(weight: str) -> str:
    return weight.removesuffix(".weight") + ".scale"  # "attn.wq_a.weight" -> "attn.wq_a.scale"


def _v4_weight_of(key: str) -> str | None:
    """The weight a V4 key scales ("x.scale" -> "x.weight"); None for any other key, the hyper-connections'
    own `attn_hc.scale` / `ffn_hc.scale` parameters (transformers' spelling) included."""
    if not key.endswith(".scale") or key.endswith("_hc.scale"):
        return None
    return key.removesuffix(".scale") + ".weight"


class Layout(NamedTuple):
    """How an architecture's tensors are named on disk, and where each lands in daulat's state dict."""

    to_hf: Callable  # model -> (main tensors, MTP tensors) under checkpoint keys, experts one by one
    target: Callable  # (key, num_layers) -> (daulat name, expert, half), "" for a key read past; None: not the model's
    hf_name: Callable  # daulat name -> the checkpoint key it is read from (the first expert's, if stacked)
    layer: re.Pattern  # a key inside a layer; group 1: the layer index
    expert: re.Pattern  # one routed expert's key; groups: layer, expert, which projection
    scale_key: Callable = _v3_scale_key  # a quantized weight's key -> its scale's
    weight_of: Callable = _v3_weight_of  # a key -> the weight it is the scale of; None: not a scale
    mtp: re.Pattern | None = None  # a key of MTP module k (group 1), where they are not layers L + k (V4)


V3_LAYOUT = Layout(to_hf_state_dict, _target, _hf_name, _LAYER, _EXPERT)
V4_LAYOUT = Layout(_v4_to_hf, _v4_target, model_v4.checkpoint_key_v4, model_v4.LAYER_KEY, model_v4.EXPERT_KEY,
                   _v4_scale_key, _v4_weight_of, model_v4.MTP_KEY)


class Architecture(NamedTuple):
    """How to read and write one `model_type`: its config class (`from_hf_dict` parses config.json), the
    model built from that config, the parameters kept in float32 at any load dtype (name fragments,
    matched within "." + name), its checkpoint names, how the buffers no checkpoint holds are made on a
    model loaded onto the meta device, whether FP8 block-scaled weights are read (and MXFP4 experts, where
    config.json says expert_dtype "fp4"), and whether they can be held FP8-resident.
    The tensor names a model accepts are its own state dict's, so an architecture's extra tensors (the
    V3.2 indexer's) pass the header and shape checks without being listed here."""

    config: type
    build: Callable[[ModelConfig], nn.Module]
    keep_fp32: tuple[str, ...]
    layout: Layout = V3_LAYOUT
    buffers: Callable[[nn.Module, object], None] = _v3_buffers
    reads_fp8: bool = True
    reads_mxfp4: bool = False
    fp8_resident: bool = True


# DeepSeek-V4 keeps in float32 what its model keeps there on a cast (model_v4.FP32_TENSORS: the
# hyper-connections, sinks, compressor position biases, router correction biases), so that a model
# loaded in bfloat16 and one cast to it agree. Its FP8 + MXFP4 releases are read, dequantized (quant.py);
# it is not held FP8-resident yet.
ARCHITECTURES = {  # config class and model from daulat.architectures, the one list of architectures
    "deepseek_v3": Architecture(*MODEL_TYPES["deepseek_v3"], ("e_score_correction_bias",)),
    "deepseek_v32": Architecture(*MODEL_TYPES["deepseek_v32"], model_v32.KEEP_FP32),
    "deepseek_v4": Architecture(*MODEL_TYPES["deepseek_v4"], model_v4.FP32_TENSORS, V4_LAYOUT, _v4_buffers,
                                reads_mxfp4=True, fp8_resident=False),
}


def architecture(raw: dict) -> Architecture:
    """The Architecture of a config.json. Any other model_type (none, kimi_k2, an unsupported one) goes
    to DeepSeek-V3's, whose parser accepts its aliases and names the type it expects otherwise."""
    return ARCHITECTURES.get(raw.get("model_type", "deepseek_v3"), ARCHITECTURES["deepseek_v3"])


def load_model(path, device="cpu", dtype: torch.dtype | None = None, *, fp8_resident: bool = False) -> nn.Module:
    """Load a checkpoint directory written by daulat or by transformers' `save_pretrained`, or an
    open-weight release (bf16 or FP8 block-scaled, one file or sharded).

    config.json and the tensor headers are checked against each other before anything is allocated;
    then the tensors are read one at a time into a model built on the meta device. The model is
    returned in eval mode, in `dtype` (default float32), on `device`. A LoRA adapter directory is read
    onto its base with the adapters merged in.

    fp8_resident: the linear layers of the main stack and the routed experts stay one byte per weight
    with their block scales (daulat.quant.FP8Linear; frozen: for inference and adapters): an FP8
    checkpoint's as stored, any other's quantized in 128 x 128 blocks as they are read.
    """
    if lora.is_adapter_dir(path):
        return _load_adapter(path, device, dtype, merge=True, fp8_resident=fp8_resident).model
    headers = read_headers(path, fp8_resident)
    model, plan, expected, arch, quant = headers.model, headers.plan, headers.expected, headers.arch, headers.quant
    resident = _resident_names(model, plan, quant is not None, arch.keep_fp32) if fp8_resident else frozenset()
    state, pairs = _stream(plan, expected, quant, device, dtype or torch.float32, arch.keep_fp32, resident)
    make_resident(model, pairs, state, dtype or torch.float32)
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    arch.buffers(model, device)  # non-persistent buffers were created on the meta device: make them real
    return model.eval()


class Headers(NamedTuple):
    """A checkpoint checked without reading a weight: its model on the meta device, the tensors that
    fill each parameter, the parameters expected, its Architecture and quantization."""

    model: nn.Module
    plan: dict
    expected: dict[str, torch.Tensor]
    arch: "Architecture"
    quant: BlockFP8 | None


def read_headers(path, fp8_resident: bool = False) -> Headers:
    """config.json and every tensor header of a checkpoint directory checked against each other (names,
    shapes, dtypes, layer and expert counts, FP8 scales) and a model built on the meta device; no
    weight is read, so this costs the same for a 700 GB release as for a small one (`daulat inspect`)."""
    path = checkpoint_dir(path)
    raw = read_json(path / "config.json", expect=dict)
    config = parse_config(raw, path / "config.json")
    arch = architecture(raw)
    quant = parse_quantization(raw, path / "config.json", mxfp4_experts=arch.reads_mxfp4)
    if fp8_resident and not arch.fp8_resident:
        raise DaulatError(f"{path / 'config.json'}: {raw['model_type']} cannot be held FP8-resident yet; "
                          "load it in bfloat16 or float32")
    if quant is not None and not arch.reads_fp8:
        raise DaulatError(f"{path / 'config.json'}: {raw['model_type']} FP8/MXFP4 weights (quantization_config) "
                          "are not supported yet; load a bf16 or float32 checkpoint")
    entries = scan(path, also=(MTP_FILE,))
    source = str(path / (MODEL_FILE if (path / MODEL_FILE).is_file() else INDEX_FILE))
    _check_counts(entries, config, arch.layout, source)
    plan = _plan(entries, config, quant, arch.layout, source)
    with torch.device("meta"):
        model = arch.build(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        plan.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    _check_shapes(plan, expected, arch.layout.hf_name, source)
    return Headers(model, plan, expected, arch, quant)


def _resident_names(model: nn.Module, plan: dict, quantized: bool, keep_fp32: tuple[str, ...]) -> frozenset[str]:
    """The parameters an FP8-resident load keeps in one byte: the weights of the main stack's linear
    layers (none the architecture keeps in float32) and its routed experts' stacks; of an FP8
    checkpoint, those it stores in FP8."""
    names = set()
    for name, module in model.named_modules():
        if not name.startswith("layers.") or any(k in f".{name}.weight" for k in keep_fp32):
            continue
        if isinstance(module, nn.Linear):
            names.add(name + ".weight")
        elif isinstance(module, MoE):
            names.update(f"{name}.{leaf}" for leaf in ("gate_up_proj", "down_proj"))
    if quantized:
        names = {n for n in names if all(piece.scale is not None for piece in plan[n])}
    return frozenset(names)


def load_info(path) -> dict:
    """daulat.json of a checkpoint ({} when the directory was not written by daulat)."""
    file = Path(path) / INFO_FILE
    return read_json(file, expect=dict) if file.is_file() else {}




def load_checkpoint(path, device="cpu", dtype: torch.dtype | None = None, *, need_tokenizer: bool = False,
                    merge_adapter: bool = True, fp8_resident: bool = False) -> Checkpoint:
    """The one loader every command uses: `model, tokenizer, info = load_checkpoint(path)`.

    need_tokenizer: a checkpoint without tokenizer.json is then an error (chat, serve, eval need one),
    raised before the weights are read.
    A LoRA adapter directory (daulat.lora) is read onto the base it names, its adapters merged into
    the weights, or with merge_adapter=False kept live (trainable, or switched off for a reference).
    fp8_resident: the base's linear layers and experts stay FP8 (see load_model).
    """
    from daulat.tokenizer import load_tokenizer

    if lora.is_adapter_dir(path):
        checkpoint = _load_adapter(path, device, dtype, merge=merge_adapter, fp8_resident=fp8_resident)
        if need_tokenizer and checkpoint.tokenizer is None:
            raise DaulatError(f"adapter {path} and its base have no tokenizer.json")
        return checkpoint
    path = checkpoint_dir(path)
    has_tokenizer = (path / "tokenizer.json").is_file()
    if need_tokenizer and not has_tokenizer:
        raise DaulatError(f"checkpoint {path} has no tokenizer.json")
    tokenizer = load_tokenizer(path) if has_tokenizer else None
    model = load_model(path, device=device, dtype=dtype, fp8_resident=fp8_resident)
    return Checkpoint(model, tokenizer, load_info(path))


def _load_adapter(path, device, dtype, merge: bool, fp8_resident: bool = False) -> Checkpoint:
    """An adapter directory on its base: the base is checked against the architecture the adapter was
    trained on before its weights are read, then loaded, then given the adapters."""
    base = lora.resolve_base(path)
    lora.check_base(path, base, load_config(base))
    base_checkpoint = load_checkpoint(base, device=device, dtype=dtype, fp8_resident=fp8_resident)
    return lora.attach_adapter(base_checkpoint, path, base, merge=merge)


def load_train_state(path) -> dict:
    """{"tensors": {...}, "meta": {...}} from a checkpoint's train_state/ (DaulatError if absent or corrupt)."""
    d = Path(path) / TRAIN_STATE_DIR
    return {"tensors": read_safetensors(d / "state.safetensors"), "meta": read_json(d / "state.json")}
