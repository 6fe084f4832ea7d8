"""How a command holds a checkpoint's weights: `--dtype` of chat, serve and eval, and `lora.base_dtype`
(the frozen base under LoRA). Torch-free, so that the command-line parsers can name the choices
without importing torch.

    fp8   the linear layers of the main stack and the routed experts stay one byte per weight with
          their block scales (daulat.quant.FP8Linear; an FP8 checkpoint as published, any other
          quantized in 128 x 128 blocks at load); everything else in bfloat16
"""

from __future__ import annotations

# name -> (the torch dtype the checkpoint is loaded in, whether it is held FP8-resident)
HOLD_DTYPES = {"float32": ("float32", False), "bfloat16": ("bfloat16", False), "float16": ("float16", False),
               "fp8": ("bfloat16", True)}
HOLD_HELP = ("weights' dtype (default: float32); fp8: the linear layers and experts stay one byte per weight with "
             "their block scales, the rest in bfloat16")


def hold(name: str | None):
    """(torch dtype or None for the default, fp8_resident) of a --dtype choice (None: not given)."""
    if name is None:
        return None, False
    import torch

    dtype, fp8_resident = HOLD_DTYPES[name]
    return getattr(torch, dtype), fp8_resident
