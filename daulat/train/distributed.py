"""Where a training process sits and how the model is spread over processes (the model knows nothing of it).

    d = init_distributed("auto")   # joins torchrun's process group when WORLD_SIZE > 1
    shard_model(model, d)          # FSDP2: each block, then the root
    full_tensor(param)             # the whole tensor of a (possibly sharded) parameter, on CPU

Under torchrun: NCCL on GPU (one GPU per rank, LOCAL_RANK), gloo on CPU.
"""

from __future__ import annotations

import atexit
import os
import platform
from dataclasses import dataclass
from typing import Any, Callable

import torch

from daulat.errors import DaulatError


@dataclass
class Dist:
    """Where this process sits: rank, world size and device. world_size 1 is a plain single process."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def sum(self, value: int) -> int:
        """An integer summed over ranks (one collective; the value itself on a single process)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t)
        return int(t.item())

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Each tensor replaced, in place, by its sum over ranks (one collective for all of them)."""
        if self.distributed and tensors:
            total = torch.stack(tensors)
            torch.distributed.all_reduce(total)
            for t, s in zip(tensors, total):
                t.copy_(s)

    def mean(self, values: torch.Tensor) -> list[float]:
        """A 1-D tensor averaged over ranks, as floats."""
        if self.distributed:
            torch.distributed.all_reduce(values)
            values = values / self.world_size
        return values.tolist()


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DaulatError(f"config train.device = {name!r}: not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DaulatError(f"config train.device = {name!r}: no CUDA device is available")
    return device


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on GPU, gloo on CPU.
    Each rank uses GPU LOCAL_RANK. Without torchrun this is a single process on `device`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    base = resolve_device(device)
    if world_size == 1:
        return Dist(0, 1, base)
    import torch.distributed as dist

    if base.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        base = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if base.type == "cuda" else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return Dist(dist.get_rank(), dist.get_world_size(), base)


def run_on_main(d: Dist, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 while the others wait; a DaulatError there is raised on every rank (no hang)."""
    if not d.distributed:
        return fn()
    result, error = None, None
    if d.is_main:
        try:
            result = fn()
        except DaulatError as e:
            error = str(e)
    box = [error]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise DaulatError(box[0])
    return result


def shard_model(model: torch.nn.Module, d: Dist) -> None:
    """FSDP2: shard each block (and each MTP module), then the root (embedding, final norm, head)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in list(model.layers) + list(getattr(model, "mtp", [])):
        fully_shard(block)
    fully_shard(model)
    # objectives call model.training_loss(...) rather than model(...): its parameters must be gathered too
    register_fsdp_forward_method(model, "training_loss")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter or state, on CPU. Collective under FSDP."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` placed as `ref` is: sharded the same way under FSDP, on the same device and dtype."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(ref.device_mesh.device_type, ref.dtype), ref.device_mesh, ref.placements)
    return full.to(ref.device, ref.dtype)


def plain_model(config, weights: dict[str, torch.Tensor]):
    """An unsharded CPU DeepseekV3 holding `weights` (gathered from the shards, for the checkpoint writer)."""
    from daulat.model import DeepseekV3, rope_frequencies

    with torch.device("meta"):
        model = DeepseekV3(config)
    model.load_state_dict(weights, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(config)[0]
    for moe in model.moe_layers():
        moe.tokens_per_expert = torch.zeros(moe.n_experts)
    return model


def to_device(batch, device: torch.device):
    """A batch (a tensor, or tuples/lists/dicts of them) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def hardware(d: Dist) -> dict:
    """What the run ran on, for the checkpoint's record."""
    if d.device.type == "cuda":
        name = torch.cuda.get_device_name(d.device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return {"device": name, "device_type": d.device.type, "world_size": d.world_size,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
