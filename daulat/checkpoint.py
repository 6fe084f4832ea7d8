"""Checkpoints are transformers `deepseek_v3` directories (see DESIGN.md):

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
file so that transformers and exports never see them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from daulat.errors import DaulatError
from daulat.model import DeepseekV3, ModelConfig, rope_frequencies

MODEL_FILE, MTP_FILE, INDEX_FILE = "model.safetensors", "mtp.safetensors", "model.safetensors.index.json"
INFO_FILE, TRAIN_STATE_DIR = "daulat.json", "train_state"

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


def from_hf_state_dict(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Map checkpoint keys (per-expert or fused) to daulat's names, stacking experts."""
    L = config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.endswith("rotary_emb.inv_freq") or key.endswith("rotary_emb.original_inv_freq"):
            continue
        m = _EXPERT.match(key)
        if m:
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = tensor
            continue
        m = _FUSED.match(key)
        if m:
            out[_layer_name(int(m[1]), f"mlp.{m[2]}", L)] = tensor
            continue
        m = _LAYER.match(key)
        if m:
            out[_layer_name(int(m[1]), m[2], L)] = tensor
        elif key == "lm_head.weight":
            out[key] = tensor
        elif key.startswith("model."):
            out[key.removeprefix("model.")] = tensor
        else:
            raise DaulatError(f"{source}: unexpected tensor {key!r}")
    for (layer, kind), per_expert in experts.items():
        n = config.n_routed_experts
        missing = sorted(set(range(n)) - set(per_expert))
        if missing:
            raise DaulatError(f"{source}: missing tensor 'model.layers.{layer}.mlp.experts.{missing[0]}.{kind}.weight'")
        stacked = torch.stack([per_expert[e] for e in range(n)])
        if kind == "down_proj":
            out[_layer_name(layer, "mlp.down_proj", L)] = stacked
        else:
            out.setdefault(("gate_up", layer), {})[kind] = stacked
    for key in [k for k in out if isinstance(k, tuple)]:
        parts = out.pop(key)
        if set(parts) != {"gate_proj", "up_proj"}:
            half = ({"gate_proj", "up_proj"} - set(parts)).pop()
            raise DaulatError(f"{source}: missing tensor 'model.layers.{key[1]}.mlp.experts.0.{half}.weight'")
        out[_layer_name(key[1], "mlp.gate_up_proj", L)] = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=1)
    return out


def _layer_name(layer: int, rest: str, num_layers: int) -> str:
    if layer < num_layers:
        return f"layers.{layer}.{rest}"
    k = layer - num_layers  # an MTP module
    special = {"shared_head.norm.weight": "norm.weight", "enorm.weight": "enorm.weight",
               "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight"}
    if rest in special:
        return f"mtp.{k}.{special[rest]}"
    if rest.startswith(("embed_tokens", "shared_head.head")):
        return f"mtp_shared.{k}.{rest}"  # DeepSeek-V3 repeats the shared embedding/head here; dropped below
    return f"mtp.{k}.block.{rest}"


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_model(model: DeepseekV3, path, tokenizer=None, info: dict | None = None,
               train_state: dict | None = None, model_card: str | None = None) -> Path:
    """Write `model` as a transformers `deepseek_v3` directory at `path`, atomically.

    tokenizer: saved beside the weights when given (anything with `.save(dir)`).
    info: JSON written as daulat.json (stage, config, data manifest, compute...).
    train_state: {"tensors": {name: Tensor}, "meta": JSON} written to train_state/ for exact resume.
    model_card: Markdown written as README.md (rendered from `info` when not given).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise DaulatError(f"cannot write checkpoint: {path.parent} is not writable")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        config = model.config
        main, mtp = to_hf_state_dict(model)
        main = {k: v.detach().cpu() for k, v in main.items()}
        save_file(main, tmp / MODEL_FILE, metadata={"format": "pt"})
        if mtp:
            save_file({k: v.detach().cpu() for k, v in mtp.items()}, tmp / MTP_FILE, metadata={"format": "pt"})
        hf_config = config.to_hf_dict()
        hf_config["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        write_json(tmp / "config.json", hf_config)
        write_json(tmp / "generation_config.json", {"bos_token_id": config.bos_token_id,
                                                    "eos_token_id": config.eos_token_id,
                                                    "pad_token_id": config.pad_token_id})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if info is not None:
            write_json(tmp / INFO_FILE, info)
            if model_card is None:  # every checkpoint documents itself
                from daulat.report import model_card as render_card

                model_card = render_card(model, info)
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
        _fsync_dir(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`. An existing target is first moved aside, so between the two renames
    the previous checkpoint still exists whole (as `.NAME.old-*`), and is removed only afterwards."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(target, old)
    os.rename(new, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DaulatError(f"missing file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DaulatError(f"{path}: not valid JSON ({e})") from None


def load_config(path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise DaulatError(f"checkpoint {path}: not a directory")
    try:
        return ModelConfig.from_hf_dict(read_json(path / "config.json"))
    except (TypeError, ValueError) as e:
        raise DaulatError(f"{path / 'config.json'}: {e}") from None


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file; a truncated or corrupt file is a DaulatError naming it."""
    if not file.is_file():
        raise DaulatError(f"missing file {file}")
    try:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise DaulatError(f"{file}: cannot read safetensors ({str(e).splitlines()[0]})") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / MODEL_FILE).is_file():
        return read_safetensors(path / MODEL_FILE)
    if (path / INDEX_FILE).is_file():  # a sharded checkpoint
        weight_map = read_json(path / INDEX_FILE).get("weight_map", {})
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(path / shard))
        return tensors
    raise DaulatError(f"checkpoint {path}: missing file {MODEL_FILE}")


def load_model(path, device="cpu", dtype: torch.dtype | None = None) -> DeepseekV3:
    """Load a checkpoint directory written by daulat or by transformers' `save_pretrained`.

    The model is returned in eval mode, in `dtype` (default float32), on `device`.
    """
    path = Path(path)
    config = load_config(path)
    tensors = _read_weights(path)
    if (path / MTP_FILE).is_file():
        tensors.update(read_safetensors(path / MTP_FILE))
    source = str(path / MODEL_FILE)
    state = from_hf_state_dict(tensors, config, source)
    if config.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in state):
        config.num_nextn_predict_layers = 0  # e.g. transformers' save_pretrained keeps no MTP weights
    state = {k: v for k, v in state.items() if not k.startswith("mtp_shared.")
             and not (k.startswith("mtp.") and int(k.split(".")[1]) >= config.num_nextn_predict_layers)}

    with torch.device("meta"):
        model = DeepseekV3(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    for name, ref in expected.items():
        if name not in state:
            raise DaulatError(f"{source}: missing tensor {_hf_name(name, config)!r}")
        if tuple(state[name].shape) != tuple(ref.shape):
            raise DaulatError(f"{source}: tensor {_hf_name(name, config)!r} has shape {tuple(state[name].shape)}, "
                              f"config.json implies {tuple(ref.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise DaulatError(f"{source}: unexpected tensor {extra[0]!r} for this config.json")

    dtype = dtype or torch.float32
    for name, tensor in state.items():
        keep_fp32 = name.endswith("e_score_correction_bias")
        state[name] = tensor.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # non-persistent buffers were created on the meta device: make them real
    model.inv_freq = rope_frequencies(config)[0].to(device)
    for moe in model.moe_layers():
        moe.tokens_per_expert = torch.zeros(moe.n_experts, device=device)
    return model.eval()


def _hf_name(name: str, config: ModelConfig) -> str:
    """The checkpoint key (first expert for stacked tensors) a daulat parameter is read from."""
    m = re.match(r"^layers\.(\d+)\.mlp\.(gate_up_proj|down_proj)$", name)
    if m:
        kind = "gate_proj" if m[2] == "gate_up_proj" else "down_proj"
        return f"model.layers.{m[1]}.mlp.experts.0.{kind}.weight"
    if name.startswith("layers.") or name in ("embed_tokens.weight", "norm.weight"):
        return "model." + name
    return name


def load_info(path) -> dict:
    """daulat.json of a checkpoint ({} when the directory was not written by daulat)."""
    file = Path(path) / INFO_FILE
    return read_json(file) if file.is_file() else {}


class Checkpoint(NamedTuple):
    """What a caller gets from `load_checkpoint`: the model, its tokenizer (None when the directory has
    none) and its record (daulat.json; {} for a checkpoint daulat did not write)."""

    model: DeepseekV3
    tokenizer: object | None
    info: dict


def load_checkpoint(path, device="cpu", dtype: torch.dtype | None = None) -> Checkpoint:
    """The one loader every command uses: `model, tokenizer, info = load_checkpoint(path)`."""
    from daulat.tokenizer import load_tokenizer

    path = Path(path)
    model = load_model(path, device=device, dtype=dtype)
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    return Checkpoint(model, tokenizer, load_info(path))


def load_train_state(path) -> dict:
    """{"tensors": {...}, "meta": {...}} from a checkpoint's train_state/ (DaulatError if absent or corrupt)."""
    d = Path(path) / TRAIN_STATE_DIR
    return {"tensors": read_safetensors(d / "state.safetensors"), "meta": read_json(d / "state.json")}
