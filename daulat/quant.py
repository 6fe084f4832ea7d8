"""FP8 block-scaled weights, as DeepSeek-V3/R1 and Kimi-K2 publish them.

A quantized linear weight W [M, N] is stored as `q` (float8_e4m3fn, [M, N]) plus `weight_scale_inv`
s (float32, [ceil(M/bm), ceil(N/bn)]) for blocks of bm x bn (`weight_block_size`, 128 x 128 in every
release), and

    W[i, j] = q[i, j] * s[i // bm, j // bn]

(DeepSeek-V3's `inference/kernel.py: weight_dequant`). Edge blocks may be ragged: DeepSeek-V3's
`kv_a_proj_with_mqa` has 576 rows, 4.5 blocks, and its last scale row covers 64 rows. Scales are either
any float32 (`scale_fmt` absent) or powers of two (`scale_fmt: "ue8m0"`, DeepSeek-V3.2), stored as
float32 or as torch's float8_e8m0fnu. Embeddings, lm_head, the router, norms and the correction bias
stay in high precision; that is the checkpoint's business, not this module's: a tensor is dequantized
exactly when it is stored in float8 and has a scale.

FP8-resident (`load_model(..., fp8_resident=True)`): the weights stay in float8 with their scales and
each product rebuilds its weight SLAB_ROWS rows at a time (`fp8_linear`, `fp8_grouped_mm`, FP8Linear),
forward and backward, exactly as the loader would have dequantized it.

DeepSeek-V4's published layout (as transformers 5.24 reads it: models/deepseek_v4, the FP8 quantizer's
`.scale` -> `weight_scale_inv` rename, integrations/finegrained_fp8.py `Fp8Dequantize`; vLLM and
DeepSeek's own inference code agree on names and dtypes):

    config.json   "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                  "weight_block_size": [128, 128], "activation_scheme": "dynamic"}, and "expert_dtype":
                  "fp4" (V4-Flash: at the top level, V4.1: inside quantization_config; "fp8" or absent:
                  the routed experts are FP8 like the rest, as in V4-Flash-Base)
    FP8 linears   `<module>.weight` F8_E4M3 [M, N] with `<module>.scale` (not `weight_scale_inv`) of
                  F8_E8M0 (ue8m0: a byte e is 2**(e - 127), a power of two) or F32, [ceil(M/bm), ceil(N/bn)]:
                  W = q * s per block, as for V3 (`dequantize`). The attention's wq_a, wq_b, wkv, wo_a,
                  wo_b, the indexer's wq_b and the shared experts are stored so.
    MXFP4 experts `layers.{i}.ffn.experts.{e}.w{1,2,3}.weight` I8 [M, N/2]: two e2m1 values per byte, the
                  low nibble the even column 2j, the high nibble column 2j + 1; each nibble is
                  sign (bit 3), exponent (bits 2-1), mantissa (bit 0): FP4_VALUES[nibble]. Beside it
                  `<...>.w{1,2,3}.scale` F8_E8M0 [M, N/32], one power of two per 32 consecutive values
                  along the input dimension (a row's columns 32g .. 32g + 31):
                  W[i, j] = FP4_VALUES[nibble(i, j)] * 2**(e[i, j // 32] - 127)   (`dequantize_mxfp4`).
    high precision the embedding, head, router (gate.weight, bf16; gate.bias float32), norms, the
                  compressors' and the indexer compressor's wkv / wgate and the indexer's weights_proj
                  (BF16, no scale: transformers lists them in _keep_in_fp32_modules to skip them),
                  hyper-connections, sinks and ape (float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from daulat.errors import DaulatError

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"
# rows of an FP8-resident weight dequantized at a time: small enough that the temporaries (about
# 10 bytes per weight of a slab) do not grow the heap (with 1024 rows a LoRA step's peak memory on a
# 420.7M-parameter base was 1.3x the 256-row figure), large enough that the products stay efficient
SLAB_ROWS = 256
RESIDENT_BLOCK = (128, 128)  # the blocks an FP8-resident load quantizes a bf16 / float32 checkpoint in
SUPPORTED = "quant_method 'fp8' with fmt 'e4m3' and a 2-number weight_block_size (DeepSeek-V3/R1, Kimi-K2)"
# e2m1 (FP4): sign, two exponent bits (bias 1), one mantissa bit; code c -> FP4_VALUES[c]
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32  # values along the input dimension sharing one power-of-two scale


@dataclass(frozen=True)
class BlockFP8:
    """A checkpoint's `quantization_config` for block-scaled FP8."""

    block: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None  # None: float32 scales; "ue8m0": powers of two
    expert_dtype: str = "fp8"  # DeepSeek-V4: "fp4", the routed experts packed MXFP4 (dequantize_mxfp4)

    def to_hf_dict(self) -> dict:
        d = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": list(self.block)}
        if self.scale_fmt:
            d["scale_fmt"] = self.scale_fmt
        if self.expert_dtype != "fp8":
            d["expert_dtype"] = self.expert_dtype
        return d


def parse_quantization(config: dict, source: str, mxfp4_experts: bool = False) -> BlockFP8 | None:
    """The `quantization_config` of a config.json, or None for an unquantized checkpoint. With
    `mxfp4_experts` (DeepSeek-V4) its `expert_dtype` is read too, inside quantization_config or at the
    top level of config.json: "fp8" (the default) or "fp4"."""
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise DaulatError(f"{source}: quantization_config must be a JSON object, not {type(q).__name__}")
    method, fmt = q.get("quant_method"), q.get("fmt", "e4m3")
    if method != "fp8":
        raise DaulatError(f"{source}: quantization_config quant_method {method!r} is not supported; "
                          f"daulat reads {SUPPORTED}")
    if fmt != "e4m3":
        raise DaulatError(f"{source}: quantization_config fmt {fmt!r} is not supported; daulat reads {SUPPORTED}")
    block = q.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise DaulatError(f"{source}: quantization_config weight_block_size {block!r}: expected two positive "
                          "integers such as [128, 128] (per-tensor FP8 is not supported)")
    scale_fmt = q.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise DaulatError(f"{source}: quantization_config scale_fmt {scale_fmt!r} is not supported "
                          "(float32 scales, or 'ue8m0' powers of two)")
    expert_dtype = (q.get("expert_dtype") or config.get("expert_dtype") or "fp8") if mxfp4_experts else "fp8"
    if expert_dtype not in ("fp8", "fp4"):
        raise DaulatError(f"{source}: expert_dtype {expert_dtype!r} is not supported ('fp8', or 'fp4': MXFP4 experts)")
    return BlockFP8(block=(block[0], block[1]), scale_fmt=scale_fmt, expert_dtype=expert_dtype)


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale tensor's shape for a weight of `shape` ([..., M, N]): ragged edge blocks round up."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float32, slab_bytes: int = 8 * 2**20) -> torch.Tensor:
    """W = q * s per block, in `dtype`. weight [..., M, N] float8; scale_inv [..., ceil(M/bm), ceil(N/bn)].

    Works through slabs of whole block rows (about `slab_bytes` of float32 each), so that the
    intermediate stays small next to the result: a streaming load's peak is the result plus one slab.
    """
    bm, bn = block
    rows, cols = weight.shape[-2:]
    lead = math.prod(weight.shape[:-2])
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    w, o = weight.reshape(lead, rows, cols), out.view(lead, rows, cols)
    scale = scale_inv.float().reshape(lead, *scale_inv.shape[-2:])
    step = max(bm, slab_bytes // (4 * cols) // bm * bm)
    for i in range(lead):
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            slab = w[i, r0:r1].float()  # [n, N]
            s = scale[i, r0 // bm:(r1 + bm - 1) // bm].repeat_interleave(bm, dim=0)[: r1 - r0]  # [n, ceil(N/bn)]
            for c0 in range(0, cols, bn):  # the last column block may be narrower: slicing keeps it ragged
                slab[:, c0:c0 + bn] *= s[:, c0 // bn, None]
            o[i, r0:r1].copy_(slab)
    return out


def mxfp4_grid(packed_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scale tensor's shape for an MXFP4 weight stored packed as `packed_shape` ([..., M, N/2])."""
    *lead, rows, half = packed_shape
    return (*lead, rows, math.ceil(2 * half / MXFP4_GROUP))


def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                     slab_bytes: int = 8 * 2**20) -> torch.Tensor:
    """W [..., M, N] in `dtype` from packed [..., M, N/2] (int8 or uint8: two e2m1 codes a byte, the low
    nibble first) and scales [..., M, ceil(N/32)] (float8_e8m0fnu, or any float: each multiplies 32
    consecutive values of its row). Slab by slab of rows, like `dequantize`."""
    rows, half = packed.shape[-2:]
    cols, lead = 2 * half, math.prod(packed.shape[:-2])
    out = torch.empty((*packed.shape[:-1], cols), dtype=dtype, device=packed.device)
    codes = packed.reshape(lead, rows, half).view(torch.uint8)
    scale, o = scales.reshape(lead, rows, scales.shape[-1]), out.view(lead, rows, cols)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=packed.device)
    step = max(1, slab_bytes // (16 * cols))  # the int64 codes and float32 values of one slab
    for i in range(lead):
        for r0 in range(0, rows, step):
            byte = codes[i, r0:r0 + step].long()
            values = torch.stack((lut[byte & 15], lut[byte >> 4]), dim=-1).reshape(byte.shape[0], cols)
            s = scale[i, r0:r0 + step].float().repeat_interleave(MXFP4_GROUP, dim=-1)[:, :cols]
            o[i, r0:r0 + step].copy_(values.mul_(s))
    return out


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int8 [..., M, N/2], scales float8_e8m0fnu [..., M, ceil(N/32)]) of a weight [..., M, N]
    (N even): each group's scale is the power of two that maps its largest magnitude to at most 6, and
    each value the nearest e2m1 one. The inverse of `dequantize_mxfp4` up to that rounding."""
    *lead, rows, cols = weight.shape
    pad = -cols % MXFP4_GROUP
    w = torch.nn.functional.pad(weight.float(), (0, pad)).reshape(*lead, rows, -1, MXFP4_GROUP)
    scale = torch.exp2(torch.ceil(torch.log2(w.abs().amax(dim=-1).clamp(min=2.0**-120) / 6.0)))
    x = (w / scale[..., None]).reshape(*lead, rows, cols + pad)[..., :cols]
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # halfway between the magnitudes
    code = torch.bucketize(x.abs(), mids) | torch.where(x < 0, 8, 0)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed.contiguous(), scale.to(torch.float8_e8m0fnu).contiguous()


def quantize(weight: torch.Tensor, block: tuple[int, int] = (128, 128),
             scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [..., M, N], scale_inv float32 [..., ceil(M/bm), ceil(N/bn)]) of a weight.

    Each block's scale maps its largest magnitude to FP8_MAX (DeepSeek's `weight_quant`); with
    scale_fmt "ue8m0" the scale is rounded up to a power of two, so no value overflows.
    """
    bm, bn = block
    *lead, rows, cols = weight.shape
    pad_r, pad_c = -rows % bm, -cols % bn
    w = torch.nn.functional.pad(weight.float(), (0, pad_c, 0, pad_r))
    blocks = w.reshape(*lead, (rows + pad_r) // bm, bm, (cols + pad_c) // bn, bn)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(w.shape)[..., :rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.float().contiguous()


def e4m3_over_256(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32 / 256, exactly for every finite value (NaN bytes, 0x7F and 0xFF, come out
    as +-480 / 256: refuse them before, see `has_nan_bytes`). The byte's sign, exponent and mantissa
    are moved into a float16's places: the float16 exponent bias (15) exceeds e4m3's (7) by 8, so the
    float16 read is the value / 2**8, subnormals included. Several times faster on a CPU than torch's
    own float8 -> float32 conversion, which is what an FP8-resident product spends its time on."""
    bits = q.view(torch.int8).to(torch.int16)  # sign-extended: bits 15..8 copy the sign
    bits <<= 7  # s eeee mmm -> bit 15 (and 14) s, 13..10 eeee, 9..7 mmm
    bits &= -16385  # clear bit 14 (0xBFFF)
    return bits.view(torch.float16).float()


def has_nan_bytes(q: torch.Tensor) -> bool:
    """Whether a float8_e4m3fn tensor holds a NaN (e4m3fn has no infinities)."""
    return bool(((q.view(torch.uint8) & 0x7F) == 0x7F).any())


def _dequant_rows(q: torch.Tensor, scale_inv: torch.Tensor, r0: int, r1: int, block: tuple[int, int],
                  dtype: torch.dtype) -> torch.Tensor:
    """Rows r0:r1 of the weight dequantized into `dtype` (r0 a multiple of the block rows), equal to
    `dequantize`'s: the product q * s is formed in float32 (as (q / 256) * (s * 256), the same number),
    in place, one whole row block per view, then cast."""
    bm, bn = block
    w = e4m3_over_256(q[r0:r1])  # [n, cols]
    n, cols = w.shape
    s = scale_inv[r0 // bm:(r1 + bm - 1) // bm].float() * 256.0  # [row blocks, column blocks]
    whole = n // bm * bm
    if cols % bn == 0:
        if whole:
            w[:whole].view(whole // bm, bm, cols // bn, bn).mul_(s[: whole // bm, None, :, None])
        if whole < n:
            w[whole:].view(n - whole, cols // bn, bn).mul_(s[-1][None, :, None])
    else:  # a ragged last column block: the scales spread over the columns (one row per row block)
        s = s.repeat_interleave(bn, dim=1)[:, :cols]
        if whole:
            w[:whole].view(whole // bm, bm, cols).mul_(s[: whole // bm, None, :])
        if whole < n:
            w[whole:].mul_(s[-1])
    return w if dtype == torch.float32 else w.to(dtype)


def _slabs(rows: int, slab_rows: int):
    return [(r0, min(rows, r0 + slab_rows)) for r0 in range(0, rows, slab_rows)]


class _FP8Product(torch.autograd.Function):
    """y = x @ W.T for W = q * s held one byte per value: the forward and the backward each rebuild W
    one slab of block rows at a time, so that no high-precision copy of W outlives its slab and
    autograd keeps only the one-byte weight (the input's gradient needs W, never x)."""

    @staticmethod
    def forward(ctx, x, q, scale_inv, block, slab_rows):
        ctx.save_for_backward(q, scale_inv)
        ctx.block, ctx.slab_rows = block, slab_rows
        return torch.cat([x @ _dequant_rows(q, scale_inv, r0, r1, block, x.dtype).T
                          for r0, r1 in _slabs(q.shape[0], slab_rows)], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        q, scale_inv = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad_x = None  # the slabs' partial sums added in float32, as one product would accumulate them
        for r0, r1 in _slabs(q.shape[0], ctx.slab_rows):
            part = (grad[..., r0:r1] @ _dequant_rows(q, scale_inv, r0, r1, ctx.block, grad.dtype)).float()
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x.to(grad.dtype), None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None = None, slab_rows: int = SLAB_ROWS) -> torch.Tensor:
    """F.linear(x, dequantize(weight, scale_inv)) for a float8 weight [out, in], in x's dtype (the
    autocast dtype under autocast), without ever holding the dequantized weight whole."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    slab_rows = max(block[0], slab_rows // block[0] * block[0])
    y = _FP8Product.apply(x, weight, scale_inv, block, slab_rows)
    return y if bias is None else y + bias.to(y.dtype)


def fp8_grouped_mm(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, counts: torch.Tensor,
                   block: tuple[int, int]) -> torch.Tensor:
    """The routed experts' product on FP8-resident stacked weights: x [N, in] with rows sorted by expert,
    weight [E, out, in] float8 with scale_inv [E, ceil(out/bm), ceil(in/bn)], counts [E] -> [N, out].
    Only the experts that received rows are dequantized, each one slab at a time."""
    chunks = x.split(counts.tolist())
    outs = [fp8_linear(chunk, weight[e], scale_inv[e], block) for e, chunk in enumerate(chunks) if chunk.shape[0]]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


class FP8Linear(torch.nn.Module):
    """A frozen linear layer held FP8-resident: the weight stays one byte per parameter
    (float8_e4m3fn [out, in]) with its float32 block scales, and the product is computed one slab of
    block rows at a time, each dequantized into the input's dtype just before use:

        y[..., rows] = x @ dequantize(q[rows], s[rows / bm]).T       (+ bias)

    so at most `slab_rows` rows of the weight ever exist in high precision, in the forward and in the
    backward alike (quant.fp8_linear). For inference and for training adapters on top (nothing here
    has a gradient; the input does). Its state dict is the published layout: `weight` and
    `weight_scale_inv`.
    """

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                 bias: torch.Tensor | None = None, slab_rows: int = SLAB_ROWS):
        super().__init__()
        if weight.dtype != torch.float8_e4m3fn or tuple(scale_inv.shape) != scale_grid(tuple(weight.shape), block):
            raise DaulatError(f"FP8Linear needs a float8_e4m3fn weight and a {scale_grid(tuple(weight.shape), block)} "
                              f"scale grid, got {weight.dtype} and {tuple(scale_inv.shape)}")
        self.block, self.slab_rows = block, max(block[0], slab_rows // block[0] * block[0])
        self.compute_dtype = torch.float32  # what effective_weight() gives; make_resident sets the model's
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale_inv", scale_inv.float())
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, block: tuple[int, int] = (128, 128),
                    scale_fmt: str | None = None) -> "FP8Linear":
        q, s = quantize(linear.weight.detach(), block, scale_fmt)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, s, block, bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight [out, in] in `dtype` (merging an adapter into it, MLA's absorbed decoding)."""
        return dequantize(self.weight, self.weight_scale_inv, self.block, dtype=dtype)

    def effective_weight(self) -> torch.Tensor:
        """The matrix this layer applies, whole, in its model's working dtype (for MLA's absorbed decoding)."""
        return self.dequantized(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.bias, self.slab_rows)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 blocks={self.block}"


def make_resident(model: torch.nn.Module, tensors: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]],
                  state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Put FP8-resident weights into a model built on the meta device, in place: each name of `tensors`
    ("layers.0.self_attn.q_proj.weight": (q, scale_inv, block)) that is an nn.Linear's weight turns that
    layer into an FP8Linear (its bias taken out of `state`); any other (the routed experts' stacked
    gate_up_proj / down_proj) becomes a float8 buffer beside a `<name>_scale_inv` buffer, its block
    size in its module's `fp8_blocks`, which the module's forward reads (daulat.model.MoE). `dtype`
    is the working dtype of the rest of the model, the one an FP8Linear gives its whole weight in
    (`effective_weight`)."""
    for name, (q, scale_inv, block) in tensors.items():
        parent, _, leaf = name.rpartition(".")
        module = model.get_submodule(parent)
        if isinstance(module, torch.nn.Linear) and leaf == "weight":
            owner, _, attr = parent.rpartition(".")
            layer = FP8Linear(q, scale_inv, block, state.pop(parent + ".bias", None))
            layer.compute_dtype = dtype
            setattr(model.get_submodule(owner), attr, layer)
        else:
            delattr(module, leaf)
            module.register_buffer(leaf, q)
            module.register_buffer(leaf + SCALE_SUFFIX, scale_inv)
            module.fp8_blocks = {**getattr(module, "fp8_blocks", {}), leaf: block}


def resident_numel(model: torch.nn.Module, skip: str | None = None) -> int:
    """The parameters a model holds FP8-resident (float8 buffers: frozen weights, not nn.Parameters),
    those under a name starting with `skip` left out."""
    return sum(b.numel() for name, b in model.named_buffers()
               if b.dtype == torch.float8_e4m3fn and not (skip and name.startswith(skip)))
