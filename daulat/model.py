"""The DeepSeek-V3 architecture (arXiv 2412.19437) in one readable file.

Semantics match Hugging Face `transformers`' `deepseek_v3` model, so a checkpoint written by daulat
loads there unchanged and vice versa (see daulat/checkpoint.py for the tensor names):

    tokens -> embed -> [Block x L] -> RMSNorm -> lm_head -> logits
    Block  = x + MLA(RMSNorm(x)); x + FFN(RMSNorm(x))
    FFN    = SwiGLU MLP for the first `first_k_dense_replace` blocks, DeepSeekMoE after them.

Shapes: B batch, T new tokens, S cached+new keys, H attention heads, D hidden size, E routed experts,
K experts per token, c = kv_lora_rank, r = qk_rope_head_dim, n = qk_nope_head_dim, v = v_head_dim.

Two attention paths over the same weights:
  * expanded: the latent c is projected up to per-head keys/values (training, prefill);
  * absorbed: kv_b_proj is folded into the query and the output, so attention runs directly against
    the cached latents; the cache holds only c + r numbers per token per layer (decoding).

One forward serves training, prefill and decoding: `model(input_ids, positions, cache)`. The model
knows nothing about distribution, optimizers or an engine's slots: a cache comes from
`model.make_cache(batch_size, max_len, device, dtype)`, and LatentCache documents the interface an
engine relies on (every architecture's cache implements it).

A decode step of a small model is mostly per-call overhead, so decoding (one new token per sequence,
with a cache) takes a few visible shortcuts in that same forward: activations are [B, D], RoPE is one
rotation matrix per token built once per step from a table, the cache row [latent | RoPE key] is
scored in one product, a few tokens run only their chosen experts, and child modules are reached
through `fast_call` (a plain function where that is exactly what the module computes).
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import daulat.quant as quant


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, named as in transformers' `DeepseekV3Config`."""

    model_type: ClassVar[str] = "deepseek_v3"  # the architecture (see daulat.architectures); not a field

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768  # SwiGLU width of the dense blocks
    moe_intermediate_size: int = 128  # SwiGLU width of each routed (and each shared) expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # MLA has no GQA: always equal to num_attention_heads
    # MLA
    q_lora_rank: int | None = None  # None: queries are projected directly (no low-rank query)
    kv_lora_rank: int = 64  # c: the latent that is cached
    qk_nope_head_dim: int = 32  # n: per-head key/query part without position
    qk_rope_head_dim: int = 16  # r: the shared decoupled RoPE key
    v_head_dim: int = 32
    # DeepSeekMoE
    first_k_dense_replace: int = 1
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # the rest
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"rope_type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # daulat's own training knobs (written to config.json too; transformers ignores them)
    num_nextn_predict_layers: int = 0  # multi-token prediction depth D (kept in mtp.safetensors)
    mtp_loss_weight: float = 0.3  # lambda
    seq_aux_loss_alpha: float = 0.0  # alpha of the sequence-wise balance loss

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            self.rope_scaling["rope_type"] = kind
            self.rope_scaling.pop("type", None)
            if kind == "default":
                self.rope_scaling = None
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"config field {name!r} = {getattr(self, name)!r}: {why}")

        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(name, "must be a positive integer")
        for name in ["qk_nope_head_dim", "first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"]:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                bad(name, "must be a non-negative integer")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", f"MLA needs it equal to num_attention_heads ({self.num_attention_heads})")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            bad("q_lora_rank", "must be a positive integer or null")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' (SwiGLU) is supported")
        if self.first_k_dense_replace < self.num_hidden_layers:  # there are MoE layers
            if not isinstance(self.n_routed_experts, int) or self.n_routed_experts <= 0:
                bad("n_routed_experts", "must be a positive integer")
            if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", "must be a positive integer")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok", f"must be between 1 and n_routed_experts ({self.n_routed_experts})")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                bad("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
            if not 1 <= self.topk_group <= self.n_group:
                bad("topk_group", f"must be between 1 and n_group ({self.n_group})")
            if self.n_routed_experts // self.n_group < 2:
                bad("n_group", "each expert group needs at least 2 experts (groups are scored by their top-2)")
            if self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
                bad("topk_group", "the selected groups hold fewer experts than num_experts_per_tok")
        if self.rope_scaling is not None:
            kind = self.rope_scaling["rope_type"]
            if kind != "yarn":
                bad("rope_scaling", "only YaRN ('yarn') scaling is supported")
            if "factor" not in self.rope_scaling or "original_max_position_embeddings" not in self.rope_scaling:
                bad("rope_scaling", "YaRN needs 'factor' and 'original_max_position_embeddings'")
        for name in ["rms_norm_eps", "rope_theta", "routed_scaling_factor", "initializer_range"]:
            if not getattr(self, name) > 0:
                bad(name, "must be positive")

    # -- derived sizes ---------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # -- transformers' config.json ---------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        """The config.json that transformers' `DeepseekV3Config` reads (daulat's extra keys included)."""
        d = asdict(self)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling)
        d.pop("rope_scaling")
        d.pop("rope_theta")
        d["rope_parameters"] = rope
        d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
                 qk_head_dim=self.qk_head_dim, head_dim=self.qk_rope_head_dim, dtype="float32")
        # the official DeepSeek-V3 config's router and layout keys, which vLLM reads to build the model
        d.update(topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1, ep_size=1,
                 aux_loss_alpha=self.seq_aux_loss_alpha, seq_aux=True, attention_dropout=0.0,
                 pretraining_tp=1, use_cache=True)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Read a config.json written by daulat or transformers (current or legacy rope keys)."""
        if d.get("model_type", "deepseek_v3") not in ("deepseek_v3", "kimi_k2"):
            raise ValueError(f"config field 'model_type' = {d.get('model_type')!r}: expected 'deepseek_v3'")
        for key, ours in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid"), ("moe_layer_freq", 1)):
            if d.get(key, ours) != ours:  # DeepSeek-V2's greedy/softmax routing is another model
                raise ValueError(f"config field {key!r} = {d[key]!r}: only {ours!r} (DeepSeek-V3) is supported")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if not scaling and d.get("rope_scaling"):  # legacy layout: rope_theta + rope_scaling at top level
            scaling = dict(d["rope_scaling"])
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            kwargs["rope_scaling"] = scaling
        else:
            kwargs["rope_scaling"] = None
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = kwargs[key][0]
        return cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 and scale in the input dtype, as transformers does; F.rms_norm is the
        # same x * rsqrt(mean(x^2) + eps) as one call instead of five (in float32 the scale goes in too)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _RMSNorm.apply(x, self.weight, self.eps)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """F.rms_norm(x [..., d], (d,), weight [d], eps) with a hand-written backward (float32 training).

    F.rms_norm's CPU backward is autograd over its decomposition (pow, mean, rsqrt, two muls), a
    dozen passes over x; written out it is five. With x_hat = x * rstd and g the output's gradient:
        grad_x = rstd * (g*w - x_hat * mean(g*w * x_hat)),  grad_w = sum over rows of g * x_hat.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = x.square().mean(dim=-1, keepdim=True).add_(eps).rsqrt_()  # [..., 1]
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, weight, rstd)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad):
        x_hat, weight, rstd = ctx.saved_tensors
        grad_x_hat = grad * weight
        dot = torch.linalg.vecdot(grad_x_hat, x_hat).unsqueeze(-1) / x_hat.shape[-1]  # [..., 1]
        grad_x = grad_x_hat.sub_(x_hat * dot).mul_(rstd)
        grad_weight = (grad * x_hat).reshape(-1, x_hat.shape[-1]).sum(0)
        return grad_x, grad_weight, None


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [r/2] and the factor applied to cos/sin (YaRN's attention factor)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ys = config.rope_scaling
    if ys is None:
        return inv_freq, 1.0
    factor = ys["factor"]
    original = ys["original_max_position_embeddings"]
    mscale, mscale_all_dim = ys.get("mscale"), ys.get("mscale_all_dim")
    attention_factor = ys.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = ys.get("beta_fast") or 32, ys.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if ys.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, T, h, r] by cos/sin [B, T, 1, r/2].

    DeepSeek's weights pair dimensions (0,1), (2,3), ... (interleave=True); the output is laid out
    de-interleaved ([rotated evens, rotated odds]) exactly as transformers does, which leaves q.k
    unchanged because queries and keys are permuted alike.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotate_pairs(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """RoPE over interleaved pairs, output interleaved too: x [..., r] (float32/64), rotation
    [..., r/2] complex (cos + i sin, broadcast over x's leading dims) -> [..., r]. Pair (2i, 2i+1)
    is the complex number x_2i + i x_2i+1, and rotating it is one complex product. The same
    numbers as apply_rope(x, cos, sin, interleave=True), laid out as pairs instead of halves."""
    pairs = x.unflatten(-1, (-1, 2))
    if pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # view_as_complex needs whole complex numbers
    return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2)


@functools.lru_cache(maxsize=None)
def _rope_basis(dim: int, interleave: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[r, r * r]: row i < r/2 is where cos_i goes in apply_rope's rotation matrix, row r/2 + i where sin_i goes."""
    half = torch.arange(dim // 2)
    x1, x2 = (2 * half, 2 * half + 1) if interleave else (half, half + dim // 2)
    basis = torch.zeros(dim, dim, dim)
    basis[half, x1, half] = 1  # out_i = x1_i cos_i - x2_i sin_i
    basis[half, x2, half + dim // 2] = 1  # out_{h+i} = x2_i cos_i + x1_i sin_i
    basis[half + dim // 2, x2, half] = -1
    basis[half + dim // 2, x1, half + dim // 2] = 1
    return basis.view(dim, dim * dim).to(device=device, dtype=dtype)


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """apply_rope as one matrix per token: cos/sin [..., r/2] -> R [N, r, r] (N tokens), with
    x @ R equal to apply_rope(x) for each token's heads x [h, r]. One matmul then rotates every head
    of a token, in place of a dozen small elementwise operations (what a decode step is made of).
    Exact: each entry of R is 0, +-cos or +-sin."""
    r = 2 * cos.shape[-1]
    table = torch.cat([cos, sin], dim=-1).reshape(-1, r)  # [N, r]
    return torch.mm(table, _rope_basis(r, interleave, table.device, table.dtype)).view(-1, r, r)


def applied_weight(layer: nn.Module) -> torch.Tensor:
    """The matrix [out, in] a linear layer applies: its `weight`, or `effective_weight()` for a wrapper
    whose matrix is not its weight alone (a live LoRA adapter, an FP8-resident layer)."""
    effective = getattr(layer, "effective_weight", None)
    return layer.weight if effective is None else effective()


def fast_call(module: nn.Module):
    """A function equal to calling the module, for decoding, where on a CPU a step of a small model
    is mostly per-call overhead (a module call with its attribute look-ups costs about as much as the
    product it makes): a hook-free nn.Linear becomes F.linear over its own weight and bias, a float32
    RMSNorm one rms_norm call, any other hook-free module its bound forward (exactly what calling it
    runs), a ModuleList a list of those. A module with hooks stays the module."""
    if isinstance(module, nn.ModuleList):
        return [fast_call(m) for m in module]
    hooks = (module._forward_hooks, module._forward_pre_hooks,
             nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)
    if any(hooks):
        return module
    if type(module) is nn.Linear:
        return functools.partial(F.linear, weight=module.weight, bias=module.bias)
    if type(module) is RMSNorm and module.weight.dtype == torch.float32:  # decoding runs in the model's dtype
        return functools.partial(torch.rms_norm, normalized_shape=module.weight.shape, weight=module.weight, eps=module.eps)
    return module.forward


class DecodeCalls:
    """A module whose forward reaches its children through `calls = self._decode_calls or self`:
    while the model decodes (see DeepseekV3.hidden_states) `_decode_calls` holds each child as its
    fast_call under the child's own name, so one forward serves every mode."""

    _decode_calls = None

    def make_decode_calls(self):
        return types.SimpleNamespace(**{name: fast_call(child) for name, child in self.named_children()})


class LatentCache:
    """MLA's decode cache: per layer one buffer [batch_size, max_len, c + r] holding each token's
    normalised latent and its rotated RoPE key side by side (one product scores both against the
    absorbed query); nothing per head. The entry at index s of a row is the token at position s, and
    a query at position p sees its row's entries 0..p (anything after p is stale or not yet written).

    The cache interface. Every architecture's cache implements it (V3.2: latents plus the indexer's
    keys; V4: a sliding-window ring plus compressed entries) and is made by its model's
    `make_cache(batch_size, max_len, device, dtype)`. The engine uses only this part:

        rows                      cache rows of the next forward's batch rows (batch row b reads and
                                  writes cache row rows[b]; a list or LongTensor [B]); None: 0..B-1
        copy_rows(source, targets, length)
                                  give each target row the state of source's first `length` tokens
                                  (a prompt prefilled once for n samples)
        bytes_per_token()         memory of the whole cache / (batch_size * max_len), in bytes
        batch_size, max_len

    and the model's forward the rest, which belongs to the architecture:

        begin(positions [B, T])   once per forward, before the layers: where the new tokens go;
                                  sets `mask` (bool [B, T, S], True where a query may attend; None
                                  when every query sees every key that `update` returns)
        update(layer_idx, entries [B, T, c + r]) -> keys [B, S, c + r]
                                  store the new tokens' entries; return the keys the batch sees
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        self.batch_size, self.max_len = batch_size, max_len
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.entries = [torch.zeros(batch_size, max_len, width, device=device, dtype=dtype)
                        for _ in range(config.num_hidden_layers)]
        self.rows: list[int] | torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def begin(self, positions: torch.Tensor) -> None:
        B, T = positions.shape
        rows = list(range(B)) if self.rows is None else [int(r) for r in self.rows]
        device = self.entries[0].device
        self._write_rows = torch.tensor(rows, device=device)[:, None]  # [B, 1]
        # a batch of consecutive rows (always the case at batch 1) is read as a view, not gathered
        self._read_rows = slice(rows[0], rows[0] + B) if rows == list(range(rows[0], rows[0] + B)) else self._write_rows[:, 0]
        self._positions = positions
        first, last = (int(p) for p in torch.aminmax(positions))
        self._span = last + 1  # entries 0..last are read
        self.mask = None
        if T > 1 or first != last:  # some query must not see some key
            self.mask = torch.arange(self._span, device=device) <= positions[:, :, None]

    def update(self, layer_idx: int, entries: torch.Tensor) -> torch.Tensor:
        buffer = self.entries[layer_idx]
        buffer[self._write_rows, self._positions] = entries if entries.dtype == buffer.dtype else entries.to(buffer.dtype)
        return buffer[self._read_rows, : self._span]

    def copy_rows(self, source: int, targets: list[int], length: int) -> None:
        if targets:
            rows = torch.tensor(targets, device=self.entries[0].device)
            for buffer in self.entries:
                buffer[rows, :length] = buffer[source, :length]

    def bytes_per_token(self) -> int:
        return sum(t.shape[-1] * t.element_size() for t in self.entries)


class MLA(DecodeCalls, nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 arXiv 2405.04434, section 2.1)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.interleave = config.rope_interleave
        self.q_lora = config.q_lora_rank is not None
        qk_dim, bias = config.qk_head_dim, config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, config.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, config.hidden_size, bias=bias)
        self.scale = qk_dim**-0.5
        self.max_logit: torch.Tensor | None = None  # [H] largest logit per head, tracked when set (QK-clip)
        if config.rope_scaling is not None and config.rope_scaling.get("mscale_all_dim"):
            self.scale *= yarn_mscale(config.rope_scaling["factor"], config.rope_scaling["mscale_all_dim"]) ** 2

    def forward(self, x, cos, sin, positions=None, cache=None, absorb=None, rotation=None):
        """x [B, T, D], or [B, D] for one new token per sequence (decoding: 2-D products are cheaper
        calls); cos/sin [B, T, 1, r/2]; cache: see LatentCache (it holds the positions, from its
        `begin`). Returns x's shape.

        absorb=None picks the absorbed path for single-token decoding with a cache, else expanded.
        rotation: rope_rotation(cos, sin) when the caller made it once for every layer.
        """
        B, T = (x.shape[0], 1) if x.dim() == 2 else x.shape[:2]
        N = B * T  # tokens
        H, n, r, c = self.n_heads, self.nope, self.rope, self.kv_lora_rank
        calls = self._decode_calls or self
        q = calls.q_b_proj(calls.q_a_layernorm(calls.q_a_proj(x))) if self.q_lora else calls.q_proj(x)
        q_nope, q_pe = q.view(N, H, n + r).split([n, r], dim=-1)  # [N, H, n], [N, H, r]
        kv_latent, k_pe = calls.kv_a_proj_with_mqa(x).view(N, c + r).split([c, r], dim=-1)  # [N, c], [N, r]
        kv_latent = calls.kv_a_layernorm(kv_latent)
        if absorb is None:
            absorb = cache is not None and T == 1
        if absorb:  # RoPE of the heads and of the shared key: one product per token
            rotation = rope_rotation(cos, sin, self.interleave) if rotation is None else rotation  # [N, r, r]
            pe = torch.bmm(torch.cat([q_pe, k_pe[:, None]], dim=1), rotation)  # [N, H + 1, r]
            q_pe, k_pe = pe[:, :H], pe[:, H]
        elif cache is None and self.interleave and q_pe.dtype in (torch.float32, torch.float64):
            # training and scoring: nothing keeps the rotated keys, so they may stay in DeepSeek's
            # pair-interleaved layout (q.k is the same in any layout both share) and rotate as one
            # complex product, about half the time of apply_rope's forward and backward
            rotation = torch.view_as_complex(torch.stack([cos.reshape(N, 1, r // 2), sin.reshape(N, 1, r // 2)], -1))
            q_pe = rotate_pairs(q_pe, rotation)
            k_pe = rotate_pairs(k_pe[:, None], rotation)[:, 0]
        else:  # a cache keeps the rotated keys in the layout the absorbed path expects (apply_rope's)
            cos, sin = cos.reshape(N, 1, r // 2), sin.reshape(N, 1, r // 2)
            q_pe = apply_rope(q_pe, cos, sin, self.interleave)
            k_pe = apply_rope(k_pe[:, None], cos, sin, self.interleave)[:, 0]
        if cache is None:
            if absorb:
                raise ValueError("the absorbed path attends to cached latents: give a cache")
            out = self._expanded(q_nope.view(B, T, H, n), q_pe.view(B, T, H, r), kv_latent.view(B, T, c),
                                 k_pe.view(B, T, r), None, causal=True)
        else:  # the cache returns every key the batch sees, its own new ones included
            keys = cache.update(self.layer_idx, torch.cat([kv_latent, k_pe], dim=-1).view(B, T, c + r))  # [B, S, c + r]
            if absorb:
                out = self._absorbed(q_nope, q_pe, keys, cache.mask)  # [N, H, v]
            else:
                out = self._expanded(q_nope.view(B, T, H, n), q_pe.view(B, T, H, r), keys[..., :c], keys[..., c:],
                                     cache.mask, causal=False)
        return calls.o_proj(out.reshape(*x.shape[:-1], H * self.v_dim))

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, n, c] and W_UV [H, c, v]: views of kv_b_proj's applied matrix (its weight, so they
        follow its in-place updates)."""
        w = applied_weight(self.kv_b_proj).view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope :].transpose(1, 2)

    def make_decode_calls(self):
        calls = super().make_decode_calls()
        calls.absorbed_weights = self.absorbed_weights()
        return calls

    def _expanded(self, q_nope, q_pe, kv_latent, k_pe, mask, causal):
        """Per-head keys/values from the latent: K [B, H, S, n+r], V [B, H, S, v]. mask [B, T, S] (True
        where a query may attend) or None: every key, or with causal=True the causal mask (T == S)."""
        B, S, _ = kv_latent.shape
        H = self.n_heads
        k_nope, v = self.kv_b_proj(kv_latent).view(B, S, H, self.nope + self.v_dim).split([self.nope, self.v_dim], -1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        if self.max_logit is not None and torch.is_grad_enabled():  # training forwards only (daulat/train/muon.py)
            self.max_logit = torch.maximum(self.max_logit, max_attention_logits(q, k, mask, causal, self.scale))
        qk_dim = self.nope + self.rope
        if self.v_dim < qk_dim:
            # SDPA's fused (flash) kernels need one head size for q, k and v and otherwise fall back
            # to the unfused math path; zero columns of v only add zero columns to the output
            v = F.pad(v, (0, qk_dim - self.v_dim))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None], is_causal=causal, scale=self.scale,
        )  # [B, H, T, max(v, n+r)]
        return out[..., : self.v_dim].transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, keys, mask):
        """Attention in latent space (DeepSeek-V2 appendix C): kv_b_proj's key half W_UK is folded into
        the query and its value half W_UV applied after attention, so per-head keys and values are
        never formed. q_nope [N, H, n] and q_pe [N, H, r] (rotated) for N = B*T tokens, keys [B, S, c + r]
        = [latent | rotated RoPE key] per cached token, mask [B, T, S] or None -> [N, H, v].

        Written as batched matrix products over (token, head) rows: one scores the latent and RoPE
        parts together, so a decode step is a handful of operations whatever the number of heads."""
        N, H, n = q_nope.shape
        B, S, _ = keys.shape
        T, c = N // B, self.kv_lora_rank
        w_uk, w_uv = self._decode_calls.absorbed_weights if self._decode_calls else self.absorbed_weights()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)  # [H, N, c]
        query = torch.cat([q_latent.transpose(0, 1), q_pe], dim=-1)  # [N, H, c + r]
        scores = torch.bmm(query.view(B, T * H, c + self.rope), keys.transpose(1, 2))  # [B, T*H, S]
        scores = (scores if scores.dtype == torch.float32 else scores.float()) * self.scale
        if mask is not None:
            scores = torch.where(mask[:, :, None], scores.view(B, T, H, S), float("-inf")).view(B, T * H, S)
        probs = scores.softmax(dim=-1)
        probs = probs if probs.dtype == keys.dtype else probs.to(keys.dtype)
        out_latent = torch.bmm(probs, keys[..., :c])  # [B, T*H, c]
        return torch.bmm(out_latent.view(N, H, c).transpose(0, 1), w_uv).transpose(0, 1)


@torch.no_grad()
def max_attention_logits(q, k, mask, causal: bool, scale: float) -> torch.Tensor:
    """q [B, T, H, d], k [B, S, H, d], mask [B, T, S] or None (every key, or the causal mask when
    `causal`), as MLA._expanded takes them -> [H]: each head's largest logit q.k * scale over the pairs
    it may attend."""
    scores = torch.einsum("bthd,bshd->bhts", q, k).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    elif causal:  # as SDPA's is_causal
        allowed = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.amax(dim=(0, 2, 3))


class MLP(DecodeCalls, nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        calls = self._decode_calls or self
        return calls.down_proj(F.silu(calls.gate_proj(x)) * calls.up_proj(x))


class Router(nn.Module):
    """Sigmoid router with group-limited top-k and the auxiliary-loss-free correction bias.

    The bias only steers which experts are chosen; the weights of the chosen experts come from the
    unbiased sigmoid scores (DeepSeek-V3 section 2.1.2).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.n_routed_experts
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        """x [N, D] -> (scores [N, E] float32, topk_weights [N, K] float32, topk_idx [N, K])."""
        scores = F.linear(_float32(x), _float32(self.weight)).sigmoid()
        choice = scores + self.e_score_correction_bias
        if self.topk_group < self.n_group:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [N, G]
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(-1, self.n_experts)
        topk_idx = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, weights if self.scaling == 1 else weights * self.scaling, topk_idx


def _float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()  # skips a no-op call: decoding is made of small calls


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, in] with rows sorted by expert, w [E, in, out], counts [E] rows per expert -> [N, out].

    One grouped GEMM (`torch._grouped_mm`) where this build supports it for the device and dtype;
    otherwise one matmul per contiguous chunk of rows (still no masking over all tokens).
    """
    # autocast does not cover _grouped_mm: give it the autocast dtype (bf16 training) or x's own
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x, w = x.to(dtype), w.to(dtype)
    if _grouped_mm_ok(x, w):
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    chunks = x.split(counts.tolist())
    return torch.cat([chunk @ w[e] for e, chunk in enumerate(chunks)]) if chunks else x.new_zeros(0, w.shape[-1])


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any(n * x.element_size() % 16 for n in (x.shape[-1], w.shape[-1])):  # its kernels need 16-byte strides
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


class MoE(DecodeCalls, nn.Module):
    """DeepSeekMoE: shared experts for every token plus K of E fine-grained routed experts.

    Routed experts are stored stacked, as transformers holds them in memory:
    gate_up_proj [E, 2I, D] (gate rows first) and down_proj [E, D, I].
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        I, D = config.moe_intermediate_size, config.hidden_size
        self.gate = Router(config)
        self.gate_up_proj = nn.Parameter(torch.empty(self.n_experts, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(self.n_experts, D, I))
        self.shared_experts = MLP(D, I * config.n_shared_experts) if config.n_shared_experts else None
        self.seq_aux_loss_alpha = config.seq_aux_loss_alpha
        self.swiglu_limit: float | None = None  # DeepSeek-V4 clamps the SwiGLU pre-activations to this
        # tokens routed to each expert since the last bias update (training only; not saved)
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None  # sequence-wise balance loss of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] or [N, D] -> the same shape."""
        D = x.shape[-1]
        flat = x if x.dim() == 2 else x.reshape(-1, D)
        calls = self._decode_calls or self
        scores, weights, topk_idx = calls.gate(flat)  # [N, E], [N, K], [N, K]
        if not self.training and flat.device.type == "cpu" and flat.shape[0] * self.top_k < self.n_experts:
            self.aux_loss = None
            routed = self._chosen_experts(flat, weights, topk_idx)
            out = routed if self.shared_experts is None else calls.shared_experts(flat) + routed
            return out if x.dim() == 2 else out.view(x.shape)
        expert_of_slot = topk_idx.reshape(-1)  # [N*K]: slot j = token j // K, its (j % K)-th expert
        order = expert_of_slot.argsort(stable=True)
        counts = torch.bincount(expert_of_slot, minlength=self.n_experts)
        token_of_slot = order // self.top_k
        # index_select rather than flat[idx]: its backward is an index_add, about half the cost on CPU
        # of the accumulating index_put that advanced indexing's backward runs
        xs = flat.index_select(0, token_of_slot)  # [N*K, D], grouped by expert
        gate, up = self._experts_mm(xs, "gate_up_proj", counts).chunk(2, dim=-1)
        if self.swiglu_limit is not None:
            gate, up = gate.clamp(max=self.swiglu_limit), up.clamp(-self.swiglu_limit, self.swiglu_limit)
        # the routing weight scales the [N*K, I] activation rather than the [N*K, D] output: the
        # down projection is linear, and usually I < D
        hidden = F.silu(gate) * up * weights.reshape(-1)[order, None].to(up.dtype)
        ys = self._experts_mm(hidden, "down_proj", counts)  # [N*K, D]
        # routed outputs are summed into the shared experts' output in place (autograd allows it:
        # a linear layer's backward does not need its own output)
        out = self.shared_experts(flat) if self.shared_experts is not None else torch.zeros_like(flat)
        out = out.index_add_(0, token_of_slot, ys)
        self.aux_loss = None  # only a training forward has a balance term (never a stale one)
        if self.training:
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype).detach()
            if self.seq_aux_loss_alpha > 0:
                self.aux_loss = self._sequence_balance_loss(scores, topk_idx, *x.shape[:2])
        return out.view(x.shape)

    def _experts_mm(self, x: torch.Tensor, name: str, counts: torch.Tensor) -> torch.Tensor:
        """x [N, in] sorted by expert through the stacked experts' `name` ([E, out, in]) -> [N, out]; an
        FP8-resident stack (daulat.quant.make_resident) is dequantized expert by expert, slab by slab."""
        w = getattr(self, name)
        if w.dtype == torch.float8_e4m3fn:
            return quant.fp8_grouped_mm(x, w, getattr(self, name + quant.SCALE_SUFFIX), counts, self.fp8_blocks[name])
        return grouped_mm(x, w.transpose(1, 2), counts)

    def _expert_linear(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        w = getattr(self, name)
        if w.dtype == torch.float8_e4m3fn:
            return quant.fp8_linear(x, w[e], getattr(self, name + quant.SCALE_SUFFIX)[e], self.fp8_blocks[name])
        return F.linear(x, w[e])

    def _chosen_experts(self, flat, weights, topk_idx):
        """The routed experts for a few tokens (N * K < E: small decode batches on a CPU, where a
        product costs its call more than its arithmetic): only the chosen experts run, one matmul pair
        each, instead of sorting tokens for a grouped product over every expert. -> [N, D]"""
        weights = weights if weights.dtype == flat.dtype else weights.to(flat.dtype)
        rows = []
        one = flat.shape[0] == 1
        for token, experts in enumerate(topk_idx.tolist()):
            x = flat if one else flat[token : token + 1]
            outs = []
            for e in experts:
                gate, up = self._expert_linear(x, "gate_up_proj", e).chunk(2, dim=-1)
                outs.append(self._expert_linear(F.silu(gate) * up, "down_proj", e))
            rows.append(torch.mm(weights if one else weights[token : token + 1], torch.cat(outs)))  # weighted sum of the K
        return rows[0] if one else torch.cat(rows)

    def _sequence_balance_loss(self, scores, topk_idx, B, T):
        """alpha * sum_i f_i P_i per sequence, averaged over the batch (DeepSeek-V3 eq. 17-20)."""
        E, K = self.n_experts, self.top_k
        chosen = torch.zeros(B * T, E, device=scores.device).scatter_(1, topk_idx, 1.0).view(B, T, E)
        f = chosen.sum(1) * (E / (K * T))  # [B, E]
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)  # [B, E]
        return self.seq_aux_loss_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> torch.Tensor:
        """Nudge the correction bias by +-gamma toward equal load; returns and resets the load counts."""
        load = self.tokens_per_expert.clone()
        if load.sum() > 0:
            self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        self.tokens_per_expert.zero_()
        return load


class Block(DecodeCalls, nn.Module):
    attention_type = MLA  # an architecture with another attention (daulat/model_v32.py) subclasses this

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.attention_type(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, positions=None, cache=None, absorb=None, rotation=None):
        calls = self._decode_calls or self
        x = x + calls.self_attn(calls.input_layernorm(x), cos, sin, positions, cache, absorb, rotation)
        return x + calls.mlp(calls.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """Multi-token prediction depth k (DeepSeek-V3 section 2.2): combines the previous depth's hidden
    state at position i with the embedding of token i+k and runs one more block; the embedding and
    output head are shared with the main model."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = Block(config, layer_idx)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h_prev, emb_next, cos, sin):
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h, cos, sin)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of the logits F.linear(h, weight) against targets: h [N, D], weight [V, D],
    targets [N] -> scalar. The value and gradients of F.cross_entropy(logits.float(), targets).

    When gradients are wanted, the logits are made a chunk of rows at a time and turned into their
    gradient (softmax - one-hot) and then into h's and weight's at once, so that the [N, V] logits,
    log-probabilities and their gradient never exist whole: each chunk stays in the CPU's cache
    (about a third less time for the head and loss of the tiny preset on CPU), and a large
    vocabulary does not need N * V floats several times over. The price: both gradients are made in
    the forward pass and held until backward (weight's as float32). Under autocast (bf16 training on
    GPU) the plain path runs, so that autocast alone picks the precision of each product.
    """
    wants_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if not wants_grad or torch.is_autocast_enabled(h.device.type):
        return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index)
    return _LinearCrossEntropy.apply(h, weight, targets, ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index):
        valid = targets != ignore_index
        n_valid = valid.sum()
        # d(mean loss)/d(logits) = (softmax - one_hot) / n_valid on valid rows, 0 on ignored ones
        row_scale = (valid / n_valid.clamp(min=1)).unsqueeze(1).float()  # [N, 1]
        safe_targets = targets.masked_fill(~valid, 0).unsqueeze(1)  # [N, 1]
        loss_sum = torch.zeros((), device=h.device)
        grad_h = torch.empty_like(h)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        rows = max(256, 2**19 // weight.shape[0])  # about 2 MiB of float32 logits per chunk
        for start in range(0, h.shape[0], rows):
            chunk = slice(start, start + rows)
            logits = F.linear(h[chunk], weight).float()  # [n, V]
            target_logit = logits.gather(1, safe_targets[chunk])  # [n, 1]
            # one exp pass serves both the loss and the gradient (logsumexp would make its own):
            # exp(logits - max) in place, its row sum z, lse = max + log z, softmax = exp / z
            row_max = logits.amax(dim=-1, keepdim=True)  # [n, 1]
            grad = logits.sub_(row_max).exp_()
            z = grad.sum(dim=-1, keepdim=True)  # [n, 1]
            loss_sum += ((row_max + z.log() - target_logit) * valid[chunk, None]).sum()
            grad.mul_(row_scale[chunk] / z)  # the softmax, already scaled by 1 / n_valid
            grad.scatter_add_(1, safe_targets[chunk], -row_scale[chunk])
            torch.mm(grad if grad.dtype == h.dtype else grad.to(h.dtype), weight, out=grad_h[chunk])
            grad_weight.addmm_(grad.t(), h[chunk].float())
        ctx.save_for_backward(grad_h, grad_weight.to(weight.dtype))
        return loss_sum / n_valid  # NaN when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors
        return grad_h * grad_loss, grad_weight * grad_loss, None, None


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class DeepseekV3(DecodeCalls, nn.Module):
    """Causal LM: `model(input_ids [B, T]) -> logits [B, T, V]`."""

    block_type = Block  # the decoder block; an architecture with another block subclasses this

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.block_type(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # MTP blocks are numbered after the main stack, like DeepSeek-V3's model.layers.61
        self.mtp = nn.ModuleList(MTPModule(config, config.num_hidden_layers + k)
                                 for k in range(config.num_nextn_predict_layers))
        inv_freq, self.rope_attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rope_table: torch.Tensor | None = None  # [positions, 1, 1, r]: cos | sin (see `rope`)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights; output projections scaled by 1/sqrt(2L) (GPT-2)."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def rope(self, positions: torch.Tensor, dtype, below: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, r/2]. With `below` (every position is known to be
        under it, as in a cache of that length) they are read from a table made once."""
        if below is not None:
            table = self._rope_table
            if table is None or len(table) < below or table.device != positions.device or table.dtype != dtype:
                cos, sin = self.rope(torch.arange(below, device=positions.device)[:, None], dtype)
                table = self._rope_table = torch.cat([cos, sin], dim=-1)  # [below, 1, 1, r]
            return table[positions, 0].chunk(2, dim=-1)
        angles = positions[..., None].float() * self.inv_freq.float()
        cos = (angles.cos() * self.rope_attention_factor).to(dtype)
        sin = (angles.sin() * self.rope_attention_factor).to(dtype)
        return cos.unsqueeze(2), sin.unsqueeze(2)

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> LatentCache:
        """The decode cache for `batch_size` sequences of up to `max_len` tokens (see LatentCache for
        the interface every architecture's cache shares); device and dtype default to the model's."""
        weight = self.embed_tokens.weight
        return LatentCache(self.config, batch_size, max_len, device=weight.device if device is None else device,
                           dtype=weight.dtype if dtype is None else dtype)

    def hidden_states(self, input_ids, positions=None, cache=None, absorb=None):
        """The trunk: input_ids [B, T] -> hidden states after the last block, before the final norm [B, T, D]."""
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when a cache is given")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if cache is not None:
            cache.begin(positions)
        # decoding one new token per sequence runs as [B, D]: 2-D products are cheaper calls than 3-D ones
        one_token = T == 1 and cache is not None
        self._decoding(one_token)
        calls = self._decode_calls or self
        x = calls.embed_tokens(input_ids[:, 0] if one_token else input_ids)
        cos, sin = self.rope(positions, x.dtype, below=None if cache is None else cache.max_len)
        if absorb is None:
            absorb = one_token
        rotation = rope_rotation(cos, sin, self.config.rope_interleave) if absorb else None  # shared by the layers
        for layer in calls.layers:
            x = layer(x, cos, sin, positions, cache, absorb, rotation)
        return x[:, None] if one_token else x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden states [..., D] (from hidden_states) -> logits [..., V]: the final norm and the output head."""
        calls = self._decode_calls or self
        return calls.lm_head(calls.norm(hidden))

    def _decoding(self, on: bool) -> None:
        """Single-token decoding reaches linear layers and norms through fast calls (see DecodeCalls).
        They are made at the first decode step after any other forward (a prefill starts every
        generation), so parameters replaced between generations are taken up; in-place updates
        (an optimizer step) are followed anyway, the calls holding the parameters themselves."""
        if on == (self._decode_calls is not None):
            return
        for module in self.modules():
            if isinstance(module, DecodeCalls):
                module._decode_calls = module.make_decode_calls() if on else None

    def forward(self, input_ids, positions=None, cache=None, absorb=None):
        """input_ids [B, T] (LongTensor) -> logits [B, T, V]. The one forward of training, prefill and decoding.

        positions [B, T] default to 0..T-1; with a cache (from `make_cache`) they are required and say
        where each new token sits in its sequence; which cache rows the batch uses is the cache's
        `rows`. With a cache, one new token per sequence runs the absorbed attention against the
        cached latents, several run the expanded attention (absorb=True/False forces either).
        """
        return self.logits(self.hidden_states(input_ids, positions, cache, absorb))

    def training_loss(self, input_ids, targets, ignore_index: int = -100):
        """Next-token cross-entropy plus the MTP and sequence-balance terms that are switched on.

        input_ids, targets [B, T] (targets[t] is the token after input_ids[t]; ignore_index masks).
        Returns (loss, stats) where stats holds detached floats: ce, mtp, balance.
        """
        h = self.hidden_states(input_ids)
        ce = linear_cross_entropy(self.norm(h).flatten(0, 1), self.lm_head.weight, targets.flatten(), ignore_index)
        loss, stats = ce, {"ce": ce.detach()}
        mtp = self.mtp_loss(h, input_ids, targets, ignore_index)
        if mtp is not None:
            loss = loss + self.config.mtp_loss_weight * mtp
            stats["mtp"] = mtp.detach()
        balance = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if balance:
            balance_loss = torch.stack(balance).sum()
            loss = loss + balance_loss
            stats["balance"] = balance_loss.detach()
        return loss, stats

    def mtp_loss(self, h, input_ids, targets, ignore_index: int = -100) -> torch.Tensor | None:
        """The MTP term: the mean over depths k = 1..D of depth k's cross-entropy, where position i
        predicts token i+k+1 (targets[:, k:]) through the shared head; None without MTP modules (or
        with sequences too short for any depth). h: the trunk's output that depth 1 reads (here
        [B, T, D]); each depth reads the one before it through `mtp_depth`."""
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            if input_ids.shape[1] - k <= 0:
                break
            h, head_input = self.mtp_depth(module, k, h, input_ids)
            losses.append(linear_cross_entropy(head_input.flatten(0, 1), self.lm_head.weight,
                                               targets[:, k:].flatten(), ignore_index))
        return torch.stack(losses).mean() if losses else None

    def mtp_depth(self, module: MTPModule, k: int, h: torch.Tensor, input_ids: torch.Tensor):
        """MTP depth k: the previous depth's hidden states h [B, >= T-k, D] and the embeddings of
        input_ids[:, k:] -> (this depth's hidden states [B, T-k, D], their final norm for the head)."""
        B, T = input_ids.shape
        positions = torch.arange(T - k, device=input_ids.device).expand(B, T - k)
        cos, sin = self.rope(positions, h.dtype)
        h = module(h[:, : T - k], self.embed_tokens(input_ids[:, k:]), cos, sin)
        return h, module.norm(h)

    @torch.no_grad()
    def update_router_bias(self, gamma: float) -> list[torch.Tensor]:
        """Auxiliary-loss-free balancing: call once after each optimizer step. Returns each MoE layer's
        expert load (tokens per expert) since the previous call. A data-parallel trainer all-reduces
        every layer's `tokens_per_expert` before calling this. `gamma` is the bias speed (the Trainer's
        train.bias_update_speed)."""
        return [moe.update_bias(gamma) for moe in self.moe_layers()]

    # -- accounting --------------------------------------------------------------------------------
    def num_parameters(self, active: bool = False, embeddings: bool = True) -> int:
        """Total parameters, or those used per token (shared + top-k routed experts) when active=True.
        MTP modules are not counted: they are a training aid, left out of exports."""
        params = {id(p): p for name, p in self.named_parameters() if not name.startswith("mtp.")}
        total = sum(p.numel() for p in params.values()) + quant.resident_numel(self, skip="mtp.")
        if not embeddings:
            total -= self.embed_tokens.weight.numel()
            if not self.config.tie_word_embeddings:
                total -= self.lm_head.weight.numel()
        if active:
            for moe in (layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)):
                unused = moe.n_experts - moe.top_k
                # from the shapes: indexing an FSDP-sharded (DTensor) stack would be a collective
                total -= unused * (math.prod(moe.gate_up_proj.shape[1:]) + math.prod(moe.down_proj.shape[1:]))
        return total


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_number: int = 2) -> dict:
    """Cache size per token over all layers: MLA's latent vs. full per-head K and V."""
    mla = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * bytes_per_number
    mha = config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * bytes_per_number
    return {"mla": mla, "mha": mha, "saving": 1 - mla / mha}
