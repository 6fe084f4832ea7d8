"""Train state for exact resume, and the step checkpoints on disk.

A step checkpoint `OUT/step-NNNNNN/` is a model directory (DESIGN.md) plus `train_state/`:

    tensors  optimizer.<param name>.<key>   every optimizer state entry (AdamW moments, Muon momentum, step)
             rng.{torch,cuda,numpy}.rank<r> each rank's random generator states
    meta     step, tokens, elapsed_s, world_size, the batch source's state_dict, python/numpy RNG
             scalars, the train config, the last train and validation loss

Restored with the same number of ranks, a run continues bitwise (on CPU, with the same thread count);
with another number of ranks, weights, moments and data position carry over and the per-rank random
streams are reseeded from the step.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from daulat.errors import DaulatError
from daulat.train.distributed import Dist, full_tensor, like, plain_model

STEP_DIR = re.compile(r"^step-(\d+)$")
FORMAT, VERSION = "daulat-train-state", 1


# ------------------------------------------------------------------------------------------------
# Checkpoints on disk
# ------------------------------------------------------------------------------------------------


def step_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """(step, path) of the complete step checkpoints in `out_dir`, oldest first. Checkpoints are
    renamed into place whole, so a directory named step-N is complete (a save cut short leaves only a
    hidden temporary directory)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m[1]), p) for p in out.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(out_dir) -> Path | None:
    found = step_checkpoints(out_dir)
    return found[-1][1] if found else None


def step_dir(out_dir, step: int) -> Path:
    return Path(out_dir) / f"step-{step:06d}"


def remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary directories of saves that a kill cut short (never a complete checkpoint)."""
    for p in Path(out_dir).glob(".*.tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(out_dir, keep_last: int) -> None:
    """Keep the newest `keep_last` step checkpoints (0: keep all)."""
    if keep_last == 0:
        return
    for _, path in step_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def load_weights(path: Path, model) -> None:
    """Load a checkpoint's weights into `model` after checking that both have the same architecture."""
    from daulat.checkpoint import load_checkpoint, load_config

    saved = load_config(path).to_hf_dict()
    ours = model.config.to_hf_dict()
    differ = [k for k in sorted(set(saved) | set(ours)) if k not in ("dtype",) and saved.get(k) != ours.get(k)]
    if differ:
        k = differ[0]
        raise DaulatError(f"cannot resume from {path}: its model.{k} is {saved.get(k)!r}, this run's is {ours.get(k)!r}")
    model.load_state_dict(load_checkpoint(path).model.state_dict())


def resume_weights(path: Path, model) -> None:
    """The weights a run resumes with: a LoRA run's adapters from its step checkpoint (an adapter
    directory; the base is the one the run was started on), else the whole checkpoint."""
    from daulat import lora

    if lora.is_lora(model):
        lora.resume_into(model, path)
    else:
        load_weights(path, model)


def gather_weights(model, d: Dist) -> dict[str, torch.Tensor] | None:
    """What `write_checkpoint` needs gathered from every rank first: a LoRA run's adapter tensors, or
    under torchrun the full tensors of the sharded model (None: the model is written as it is)."""
    from daulat import lora

    if lora.is_lora(model):
        return lora.adapter_state_dict(model)
    if d.distributed:
        return {k: full_tensor(v) for k, v in model.state_dict().items()}
    return None


def write_checkpoint(model, path, weights, model_config, *, tokenizer, info: dict, train_state: dict | None) -> None:
    """The main rank's write of a Trainer checkpoint: for a LoRA run a PEFT adapter directory (the base
    is never written), else a model directory; both with their model card."""
    from daulat import lora
    from daulat.report import save_documented  # the writer, plus the model card from the record

    if lora.is_lora(model):
        save_documented(model, path, tokenizer=tokenizer, info=info, train_state=train_state, tensors=weights)
        return
    model = model if weights is None else plain_model(model_config, weights)
    save_documented(model, path, tokenizer=tokenizer, info=info, train_state=train_state)


# ------------------------------------------------------------------------------------------------
# Random generators
# ------------------------------------------------------------------------------------------------


def seed_rngs(seed: int, rank: int) -> None:
    """Each rank its own stream (sampling in RL differs per rank), all from one seed."""
    seed = seed + 1000003 * rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _rng_of_all_ranks(d: Dist) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(tensors, JSON scalars) of every rank's generators (a collective under torchrun)."""
    rng = _rng_state(d.device)
    gathered = [rng]
    if d.distributed:
        gathered = [None] * d.world_size
        torch.distributed.all_gather_object(gathered, rng)
    tensors, meta = {}, []
    for rank, r in enumerate(gathered):
        tensors[f"rng.torch.rank{rank}"] = r.pop("torch")
        if "cuda" in r:
            tensors[f"rng.cuda.rank{rank}"] = r.pop("cuda")
        tensors[f"rng.numpy.rank{rank}"] = r.pop("numpy_keys")
        meta.append(r)
    return tensors, meta


def _restore_rng(tensors: dict, meta: list[dict], rank: int, device: torch.device) -> None:
    torch.set_rng_state(tensors[f"rng.torch.rank{rank}"])
    if device.type == "cuda" and f"rng.cuda.rank{rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], device)
    r = meta[rank]
    np.random.set_state((r["numpy"][0], tensors[f"rng.numpy.rank{rank}"].numpy().astype(np.uint32), *r["numpy"][1:]))
    random.setstate((r["python"][0], tuple(r["python"][1]), r["python"][2]))


# ------------------------------------------------------------------------------------------------
# The whole train state
# ------------------------------------------------------------------------------------------------


def capture(model, optimizer, batches, d: Dist, progress: dict, train_config: dict) -> dict:
    """{"tensors", "meta"} for checkpoint.save_model's train_state (collective under torchrun).
    progress: step, tokens, elapsed_s, last_loss, last_val_loss."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optimizer.{names[id(p)]}.{key}"] = full_tensor(value) if torch.is_tensor(value) else torch.tensor(value)
    rng_tensors, rng_meta = _rng_of_all_ranks(d)
    tensors.update(rng_tensors)
    meta = {"format": FORMAT, "version": VERSION, "step": progress["step"], "tokens": progress["tokens"],
            "elapsed_s": progress["elapsed_s"], "world_size": d.world_size,
            "batches": batches.state_dict() if hasattr(batches, "state_dict") else None,
            "rng": rng_meta, "train_config": train_config,
            "last_loss": progress["last_loss"], "last_val_loss": progress["last_val_loss"]}
    return {"tensors": tensors, "meta": meta}


def restore(path: Path, model, optimizer, batches, d: Dist, seed: int) -> dict:
    """Put a checkpoint's train state back: optimizer state (re-sharded as the live parameters are),
    RNG streams, the batch source's position. Returns the progress dict `capture` was given."""
    from daulat.checkpoint import load_train_state

    state = load_train_state(path)
    tensors, meta = state["tensors"], state["meta"]
    try:
        step = int(meta["step"])
        _restore_optimizer(optimizer, model, tensors, path, step)
        if meta.get("world_size") == d.world_size:
            _restore_rng(tensors, meta["rng"], d.rank, d.device)
        else:  # another number of ranks: per-rank streams cannot carry over; reseed from the step
            seed_rngs(seed + step, d.rank)
        if meta.get("batches") is not None and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(meta["batches"])
        return {"step": step, "tokens": int(meta["tokens"]), "elapsed_s": float(meta.get("elapsed_s", 0.0)),
                "last_loss": meta.get("last_loss"), "last_val_loss": meta.get("last_val_loss")}
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DaulatError(f"{path}/train_state is incomplete or corrupt ({type(e).__name__}: {e})") from None


def _restore_optimizer(optimizer, model, tensors: dict, path: Path, step: int) -> None:
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = []
    for name, p in model.named_parameters():
        prefix = f"optimizer.{name}."
        entries = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not entries:
            if id(p) in trained:
                missing.append(name)
            continue
        # "step" stays a CPU scalar as torch's AdamW keeps it; moments go where the parameter lives
        optimizer.state[p] = {key: value if key == "step" else like(value, p) for key, value in entries.items()}
    if missing and step > 0:
        raise DaulatError(f"{path}/train_state: no optimizer state for parameter {missing[0]!r}")
