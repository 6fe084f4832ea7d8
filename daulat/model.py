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

The model knows nothing about distribution, optimizers or caches' memory layout: a cache is any
object with `update(layer_idx, kv_latent, k_pe, positions) -> (kv_all, pe_all)` (see LatentCache).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, named as in transformers' `DeepseekV3Config`."""

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
    bias_update_speed: float = 1e-3  # gamma of auxiliary-loss-free balancing
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
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Read a config.json written by daulat or transformers (current or legacy rope keys)."""
        if d.get("model_type", "deepseek_v3") not in ("deepseek_v3", "kimi_k2"):
            raise ValueError(f"config field 'model_type' = {d.get('model_type')!r}: expected 'deepseek_v3'")
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
        # same x * rsqrt(mean(x^2) + eps) as one fused kernel instead of five elementwise ones
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


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


class LatentCache:
    """The MLA decode cache: per layer, the normalised latent [B, S_max, c] and the rotated RoPE key
    [B, S_max, r]; nothing per head. The key stored at index s of a row has position s.

    `rows` (optional LongTensor [B_active]) selects which cache rows the current batch writes to and
    reads from, so an engine can keep a fixed pool of sequence slots and batch any subset of them.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, max_len)
        self.kv = [torch.zeros(*shape, config.kv_lora_rank, device=device, dtype=dtype)
                   for _ in range(config.num_hidden_layers)]
        self.pe = [torch.zeros(*shape, config.qk_rope_head_dim, device=device, dtype=dtype)
                   for _ in range(config.num_hidden_layers)]
        self.rows: torch.Tensor | None = None

    def update(self, layer_idx: int, kv_latent: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor):
        """Store kv_latent [B, T, c] and k_pe [B, T, r] at `positions` [B, T]; return every row's keys
        up to the largest position: ([B, S, c], [B, S, r])."""
        kv, pe = self.kv[layer_idx], self.pe[layer_idx]
        rows = self.rows if self.rows is not None else torch.arange(kv_latent.shape[0], device=kv.device)
        kv[rows[:, None], positions] = kv_latent.to(kv.dtype)
        pe[rows[:, None], positions] = k_pe.to(pe.dtype)
        length = int(positions.max()) + 1
        return kv[rows, :length], pe[rows, :length]

    def bytes_per_token(self) -> int:
        return sum(t[0, 0].numel() * t.element_size() for t in self.kv + self.pe)


class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 arXiv 2405.04434, section 2.1)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.interleave = config.rope_interleave
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
        if config.rope_scaling is not None and config.rope_scaling.get("mscale_all_dim"):
            self.scale *= yarn_mscale(config.rope_scaling["factor"], config.rope_scaling["mscale_all_dim"]) ** 2

    def forward(self, x, cos, sin, positions=None, cache=None, absorb=None):
        """x [B, T, D]; cos/sin [B, T, 1, r/2]; positions [B, T] (needed with a cache). Returns [B, T, D].

        absorb=None picks the absorbed path for single-token decoding with a cache, else expanded.
        """
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)  # [B, T, H, r]
        kv_latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        kv_latent = self.kv_a_layernorm(kv_latent)  # [B, T, c]
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)  # [B, T, r]

        mask = None  # boolean [B, 1, T, S], True where a query may attend
        if cache is not None:
            kv_latent, k_pe = cache.update(self.layer_idx, kv_latent, k_pe, positions)  # [B, S, c], [B, S, r]
            key_pos = torch.arange(kv_latent.shape[1], device=x.device)
            mask = (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        if absorb is None:
            absorb = cache is not None and T == 1
        if absorb:
            out = self._absorbed(q_nope, q_pe, kv_latent, k_pe, mask)
        else:
            out = self._expanded(q_nope, q_pe, kv_latent, k_pe, mask)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))

    def _expanded(self, q_nope, q_pe, kv_latent, k_pe, mask):
        """Per-head keys/values from the latent: K [B, H, S, n+r], V [B, H, S, v]."""
        B, S, _ = kv_latent.shape
        H = self.n_heads
        k_nope, v = self.kv_b_proj(kv_latent).view(B, S, H, self.nope + self.v_dim).split([self.nope, self.v_dim], -1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        qk_dim = self.nope + self.rope
        if self.v_dim < qk_dim:
            # SDPA's fused (flash) kernels need one head size for q, k and v and otherwise fall back
            # to the unfused math path; zero columns of v only add zero columns to the output
            v = F.pad(v, (0, qk_dim - self.v_dim))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=self.scale,
        )  # [B, H, T, max(v, n+r)]
        return out[..., : self.v_dim].transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, kv_latent, k_pe, mask):
        """Attention in latent space: kv_b_proj's key half is folded into the query and its value half
        into the output, so per-head keys/values are never formed."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w[:, : self.nope])  # [B, T, H, c]
        scores = torch.einsum("bthc,bsc->bhts", q_latent, kv_latent) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
        scores = scores.float() * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(q_nope.dtype)  # [B, H, T, S]
        out_latent = torch.einsum("bhts,bsc->bthc", probs, kv_latent)
        return torch.einsum("bthc,hvc->bthv", out_latent, w[:, self.nope :])  # [B, T, H, v]


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
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
        return scores, weights * self.scaling, topk_idx


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


class MoE(nn.Module):
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
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        scores, weights, topk_idx = self.gate(flat)  # [N, E], [N, K], [N, K]
        expert_of_slot = topk_idx.reshape(-1)  # [N*K]: slot j = token j // K, its (j % K)-th expert
        order = expert_of_slot.argsort(stable=True)
        counts = torch.bincount(expert_of_slot, minlength=self.n_experts)
        token_of_slot = order // self.top_k
        # index_select rather than flat[idx]: its backward is an index_add, about half the cost on CPU
        # of the accumulating index_put that advanced indexing's backward runs
        xs = flat.index_select(0, token_of_slot)  # [N*K, D], grouped by expert
        gate, up = grouped_mm(xs, self.gate_up_proj.transpose(1, 2), counts).chunk(2, dim=-1)
        if self.swiglu_limit is not None:
            gate, up = gate.clamp(max=self.swiglu_limit), up.clamp(-self.swiglu_limit, self.swiglu_limit)
        # the routing weight scales the [N*K, I] activation rather than the [N*K, D] output: the
        # down projection is linear, and usually I < D
        hidden = F.silu(gate) * up * weights.reshape(-1)[order, None].to(up.dtype)
        ys = grouped_mm(hidden, self.down_proj.transpose(1, 2), counts)  # [N*K, D]
        # routed outputs are summed into the shared experts' output in place (autograd allows it:
        # a linear layer's backward does not need its own output)
        out = self.shared_experts(flat) if self.shared_experts is not None else torch.zeros_like(flat)
        out = out.index_add_(0, token_of_slot, ys)
        self.aux_loss = None  # only a training forward has a balance term (never a stale one)
        if self.training:
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype).detach()
            if self.seq_aux_loss_alpha > 0:
                self.aux_loss = self._sequence_balance_loss(scores, topk_idx, B, T)
        return out.view(B, T, D)

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


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, positions=None, cache=None, absorb=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, absorb)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        row_scale = (valid / n_valid.clamp(min=1)).unsqueeze(1)  # [N, 1]
        safe_targets = targets.masked_fill(~valid, 0).unsqueeze(1)  # [N, 1]
        loss_sum = torch.zeros((), device=h.device)
        grad_h = torch.empty_like(h)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        rows = max(256, 2**19 // weight.shape[0])  # about 2 MiB of float32 logits per chunk
        for start in range(0, h.shape[0], rows):
            chunk = slice(start, start + rows)
            logits = F.linear(h[chunk], weight).float()  # [n, V]
            lse = logits.logsumexp(dim=-1, keepdim=True)  # [n, 1]
            loss_sum += ((lse - logits.gather(1, safe_targets[chunk])) * valid[chunk, None]).sum()
            grad = logits.sub_(lse).exp_()  # the softmax, in place of the logits
            grad.scatter_add_(1, safe_targets[chunk], grad.new_full(lse.shape, -1.0))
            grad *= row_scale[chunk]
            grad_h[chunk] = grad.to(h.dtype) @ weight
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


class DeepseekV3(nn.Module):
    """Causal LM: `model(input_ids [B, T]) -> logits [B, T, V]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # MTP blocks are numbered after the main stack, like DeepSeek-V3's model.layers.61
        self.mtp = nn.ModuleList(MTPModule(config, config.num_hidden_layers + k)
                                 for k in range(config.num_nextn_predict_layers))
        inv_freq, self.rope_attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
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

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, r/2]."""
        angles = positions[..., None].float() * self.inv_freq.float()
        cos = (angles.cos() * self.rope_attention_factor).to(dtype)
        sin = (angles.sin() * self.rope_attention_factor).to(dtype)
        return cos.unsqueeze(2), sin.unsqueeze(2)

    def hidden_states(self, input_ids, positions=None, cache=None, absorb=None):
        """The trunk: input_ids [B, T] -> hidden states after the last block, before the final norm [B, T, D]."""
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when a cache is given")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, cache, absorb)
        return x

    def forward(self, input_ids, positions=None, cache=None, absorb=None):
        """input_ids [B, T] (LongTensor) -> logits [B, T, V].

        positions [B, T] default to 0..T-1; with a cache (see LatentCache) they are required and say
        where each new token sits in its sequence.
        """
        return self.lm_head(self.norm(self.hidden_states(input_ids, positions, cache, absorb)))

    def training_loss(self, input_ids, targets, ignore_index: int = -100):
        """Next-token cross-entropy plus the MTP and sequence-balance terms that are switched on.

        input_ids, targets [B, T] (targets[t] is the token after input_ids[t]; ignore_index masks).
        Returns (loss, stats) where stats holds detached floats: ce, mtp, balance.
        """
        h = self.hidden_states(input_ids)
        ce = linear_cross_entropy(self.norm(h).flatten(0, 1), self.lm_head.weight, targets.flatten(), ignore_index)
        loss, stats = ce, {"ce": ce.detach()}
        if len(self.mtp):
            mtp_losses = []
            T = input_ids.shape[1]
            for k, module in enumerate(self.mtp, start=1):
                if T - k <= 0:
                    break
                positions = torch.arange(T - k, device=input_ids.device).expand(input_ids.shape[0], T - k)
                cos, sin = self.rope(positions, h.dtype)
                h = module(h[:, : T - k], self.embed_tokens(input_ids[:, k:]), cos, sin)
                mtp_losses.append(linear_cross_entropy(module.norm(h).flatten(0, 1), self.lm_head.weight,
                                                       targets[:, k:].flatten(), ignore_index))
            if mtp_losses:
                mtp = torch.stack(mtp_losses).mean()
                loss = loss + self.config.mtp_loss_weight * mtp
                stats["mtp"] = mtp.detach()
        balance = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if balance:
            balance_loss = torch.stack(balance).sum()
            loss = loss + balance_loss
            stats["balance"] = balance_loss.detach()
        return loss, stats

    @torch.no_grad()
    def update_router_bias(self, gamma: float | None = None) -> list[torch.Tensor]:
        """Auxiliary-loss-free balancing: call once after each optimizer step. Returns each MoE layer's
        expert load (tokens per expert) since the previous call. A data-parallel trainer all-reduces
        every layer's `tokens_per_expert` before calling this."""
        gamma = self.config.bias_update_speed if gamma is None else gamma
        return [moe.update_bias(gamma) for moe in self.moe_layers()]

    # -- accounting --------------------------------------------------------------------------------
    def num_parameters(self, active: bool = False, embeddings: bool = True) -> int:
        """Total parameters, or those used per token (shared + top-k routed experts) when active=True.
        MTP modules are not counted: they are a training aid, left out of exports."""
        params = {id(p): p for name, p in self.named_parameters() if not name.startswith("mtp.")}
        total = sum(p.numel() for p in params.values())
        if not embeddings:
            total -= self.embed_tokens.weight.numel()
            if not self.config.tie_word_embeddings:
                total -= self.lm_head.weight.numel()
        if active:
            for moe in (layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)):
                unused = moe.n_experts - moe.top_k
                total -= unused * (moe.gate_up_proj[0].numel() + moe.down_proj[0].numel())
        return total


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_number: int = 2) -> dict:
    """Cache size per token over all layers: MLA's latent vs. full per-head K and V."""
    mla = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * bytes_per_number
    mha = config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * bytes_per_number
    return {"mla": mla, "mha": mha, "saving": 1 - mla / mha}
