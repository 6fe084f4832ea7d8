"""The DeepSeek-V4 architecture, with transformers' `deepseek_v4` semantics (checkpoints load both ways):

    tokens -> embed -> copy into n = hc_mult residual streams -> [Block x L] -> collapse -> RMSNorm -> lm_head
    Block  = streams mixed through a hyper-connection around attention, then around the MoE

  * attention (daulat/v4_attention.py): shared-KV multi-query attention over a sliding window in every
    layer, plus compressed entries (CSA with a top-k indexer, or HCA) as `layer_types` says;
  * manifold-constrained hyper-connections: each block reads a weighted sum of the n streams and writes
    its output back to each of them, while the streams are mixed by a doubly stochastic matrix
    (Sinkhorn-Knopp), computed in float32;
  * MoE: daulat's grouped-GEMM experts with V4's SwiGLU clamp; the first layers route by a frozen
    token-id table (`tid2eid`), the rest by top-k of sqrt(softplus) scores plus the correction bias.

Shapes: B batch, T tokens, n streams, D hidden size, E routed experts, K experts per token, V vocab.
Multi-token prediction (num_nextn_predict_layers = D > 0) is V3's, on the streams: depth k takes the
previous depth's n streams (the trunk's before hc_head, at k = 1), adds e_proj(enorm(embedding of
token i+k)) to h_proj(hnorm(stream)) for each stream, runs one more V4 block (sliding-window
attention, learned routing) and collapses the streams by its own hc_head before its norm and the
shared head; position i then predicts token i+k+1, and the mean over depths, times mtp_loss_weight,
joins the training loss. This follows the tensors of DeepSeek-V4's release (`mtp.0.e_proj`,
`h_proj`, `enorm`, `hnorm`, `norm`, `hc_head_*`, `hc_attn_*`, `hc_ffn_*`, `attn.*` without a
compressor, `ffn.gate.bias` without `tid2eid`) and SGLang's reading of them (its DeepSeek-V4 NextN
model: the streams are normed and projected one by one, the embedding added to each); transformers
builds no MTP and ignores `mtp.*` on load. Not confirmed against DeepSeek's own training code: the
RoPE positions of depth k (0..T-k-1 here, as daulat's V3) and whether the next depth reads the
streams (here) or the collapsed state. Decoding and `forward` leave MTP out. Decoding runs the same
forward over the new tokens with a V4Cache (per layer: the last W - 1 keys, the compressors' partial windows and
entries, the indexers' keys); each cache row advances at its own position.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from daulat.model import MLP, DeepseekV3, MoE, RMSNorm, linear_cross_entropy, rope_frequencies
from daulat.v4_attention import LayerCache, Rotary, V4Attention, split_states, stack_states, unit_rms

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
# tensors that stay float32 whatever dtype the model is cast to (transformers keeps them so too): the
# hyper-connections, whose Sinkhorn iterations and sigmoid gates are sensitive, the sinks, the
# compressors' position biases, the routers' correction biases and the RoPE frequencies (a bfloat16
# frequency times a large position is a wrong angle). (The norms, which transformers also keeps in
# float32, follow the model's dtype here: daulat's RMSNorm scales in the input's dtype.)
FP32_TENSORS = ("attn_hc.", "ffn_hc.", "hc_head.", ".sinks", ".position_bias", ".e_score_correction_bias",
                ".inv_freq")


@dataclass
class ModelConfigV4:
    """Hyper-parameters, named as in transformers' `DeepseekV4Config` (small defaults for tests)."""

    model_type: ClassVar[str] = "deepseek_v4"

    vocab_size: int = 512
    hidden_size: int = 64
    moe_intermediate_size: int = 32  # each routed expert's and the shared expert's SwiGLU width
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 1  # one key/value head shared by all query heads
    head_dim: int = 32
    qk_rope_head_dim: int = 8  # r: the rotated tail of each head (transformers: partial_rotary_factor * head_dim)
    q_lora_rank: int = 32
    o_groups: int = 2
    o_lora_rank: int = 16
    sliding_window: int = 8
    layer_types: list[str] = field(default_factory=lambda: list(LAYER_TYPES))
    compress_rates: dict = field(default_factory=lambda: {"compressed_sparse_attention": 4,
                                                          "heavily_compressed_attention": 8})
    index_n_heads: int = 16
    index_head_dim: int = 16
    index_topk: int = 4
    # RoPE: `rope_theta` for sliding layers, `compress_rope_theta` (+ optional YaRN) for CSA/HCA layers
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict | None = None  # the compress branch's YaRN: {"rope_type": "yarn", "factor", ...}
    max_position_embeddings: int = 4096
    # hyper-connections
    hc_mult: int = 2
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # MoE
    mlp_layer_types: list[str] = field(default_factory=lambda: ["hash_moe", "moe", "moe"])
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    # the rest
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 0  # multi-token prediction depth D (kept in mtp.safetensors)
    # daulat's training knobs (transformers ignores them)
    mtp_loss_weight: float = 0.3  # lambda, as V3's
    seq_aux_loss_alpha: float = 0.0
    indexer_loss_weight: float = 0.0  # > 0: the CSA indexers learn toward their attention (KL)
    n_group: int = 1  # daulat's MoE reads these; V4 has no group-limited routing
    topk_group: int = 1

    def __post_init__(self):
        self.layer_types, self.mlp_layer_types = list(self.layer_types), list(self.mlp_layer_types)
        self.compress_rates = dict(self.compress_rates)
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            self.rope_scaling["rope_type"] = self.rope_scaling.pop("type", self.rope_scaling.get("rope_type"))
            if self.rope_scaling["rope_type"] in (None, "default"):
                self.rope_scaling = None
            else:  # V4 does not scale cos/sin by YaRN's mscale unless told to
                self.rope_scaling.setdefault("attention_factor", 1.0)
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"config field {name!r} = {getattr(self, name)!r}: {why}")

        for name in ["vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups",
                     "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
                     "hc_mult", "hc_sinkhorn_iters", "n_routed_experts", "num_experts_per_tok"]:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(name, "must be a positive integer")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be a non-negative integer")
        if self.num_key_value_heads != 1:
            bad("num_key_value_heads", "DeepSeek-V4 shares one key/value head")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > min(self.head_dim, self.index_head_dim):
            bad("qk_rope_head_dim", "must be even and at most head_dim and index_head_dim")
        if self.num_attention_heads * self.head_dim % self.o_groups:
            bad("o_groups", "must divide num_attention_heads * head_dim")
        for name, allowed in (("layer_types", LAYER_TYPES), ("mlp_layer_types", ("hash_moe", "moe"))):
            types = getattr(self, name)
            if len(types) != self.num_hidden_layers or any(t not in allowed for t in types):
                bad(name, f"needs num_hidden_layers entries from {allowed}")
        for kind in set(self.layer_types) - {"sliding_attention"}:
            rate = self.compress_rates.get(kind)
            if not isinstance(rate, int) or rate <= 0:
                bad("compress_rates", f"needs a positive integer rate for {kind!r}")
        if not self.num_experts_per_tok <= self.n_routed_experts:
            bad("num_experts_per_tok", "must be at most n_routed_experts")
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid"):
            bad("scoring_func", "must be 'sqrtsoftplus' or 'sigmoid'")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' (SwiGLU) is supported")
        if self.rope_scaling is not None and (self.rope_scaling["rope_type"] != "yarn" or not
                                              {"factor", "original_max_position_embeddings"} <= set(self.rope_scaling)):
            bad("rope_scaling", "only YaRN with 'factor' and 'original_max_position_embeddings' is supported")

    # -- transformers' config.json ---------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        """The config.json that transformers' `DeepseekV4Config` reads (daulat's knobs included)."""
        d = asdict(self)
        for key in ("rope_scaling", "qk_rope_head_dim", "n_group", "topk_group"):
            d.pop(key)
        factor = self.qk_rope_head_dim / self.head_dim
        main = {"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": factor}
        compress = {"rope_type": "default", **(self.rope_scaling or {}),
                    "rope_theta": self.compress_rope_theta, "partial_rotary_factor": factor}
        d.update(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], dtype="float32",
                 partial_rotary_factor=factor, rope_parameters={"main": main, "compress": compress})
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfigV4":
        """Read a config.json written by daulat or transformers (nested or flat rope parameters)."""
        if d.get("model_type") != "deepseek_v4":
            raise ValueError(f"config field 'model_type' = {d.get('model_type')!r}: expected 'deepseek_v4'")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        head_dim = d.get("head_dim", cls.head_dim)
        if d.get("partial_rotary_factor"):
            kwargs["qk_rope_head_dim"] = int(head_dim * d["partial_rotary_factor"])
        rope = d.get("rope_parameters") or {}
        compress = rope.get("compress", {k: v for k, v in rope.items() if k != "main"})
        if "rope_theta" in rope.get("main", {}):
            kwargs["rope_theta"] = rope["main"]["rope_theta"]
        if "rope_theta" in compress and "main" in rope:
            kwargs["compress_rope_theta"] = compress["rope_theta"]
        scaling = {k: v for k, v in compress.items() if k not in ("rope_theta", "partial_rotary_factor")}
        kwargs["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = kwargs[key][0]
        return cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# Hyper-connections
# ------------------------------------------------------------------------------------------------


class HyperConnection(nn.Module):
    """Manifold-constrained hyper-connection (mHC) around one attention or MoE block.

    From the n streams it makes, by a one-layer perceptron over their flattened, normalised values:
    pre [n] (how the block's input is read), post [n] (how its output is written to each stream) and
    comb [n, n] (how the streams carry over), comb projected onto doubly stochastic matrices so that
    mixing neither grows nor shrinks the residual. Kept in float32, as transformers does.
    """

    def __init__(self, config: ModelConfigV4):
        super().__init__()
        n = config.hc_mult
        self.n, self.iters, self.eps, self.norm_eps = n, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, streams: torch.Tensor):
        """streams [B, T, n, D] -> (post [B, T, n], comb [B, T, n, n], block input [B, T, D]), float32 weights."""
        n = self.n
        mixes = F.linear(unit_rms(streams.flatten(2).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * comb_s + comb_b.view(n, n), dim=-1) + self.eps
        # Sinkhorn-Knopp: alternate column and row normalisation (columns first and last)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
        return post, comb, collapsed


class HyperHead(nn.Module):
    """The final collapse of the n streams into one hidden state: [B, T, n, D] -> [B, T, D]."""

    def __init__(self, config: ModelConfigV4):
        super().__init__()
        n = config.hc_mult
        self.eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(n))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(unit_rms(streams.flatten(2).float(), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


def mix_streams(streams: torch.Tensor, block_out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor):
    """streams [B, T, n, D], block_out [B, T, D] -> new streams: out written by `post`, streams carried
    by comb (new stream k = sum_j comb[j, k] * stream j; comb is not symmetric)."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * block_out.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams


# ------------------------------------------------------------------------------------------------
# MoE
# ------------------------------------------------------------------------------------------------


def _score(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    return F.softplus(logits).sqrt() if scoring_func == "sqrtsoftplus" else logits.sigmoid()


class V4Router(nn.Module):
    """Top-k of the scores plus the correction bias (which only steers the choice); the chosen scores,
    normalised and scaled, weight the experts."""

    def __init__(self, config: ModelConfigV4):
        super().__init__()
        self.top_k, self.scoring_func = config.num_experts_per_tok, config.scoring_func
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores + self.e_score_correction_bias).topk(self.top_k, dim=-1, sorted=False).indices

    def forward(self, x: torch.Tensor):
        """x [N, D] -> (scores [N, E] float32, weights [N, K], expert indices [N, K])."""
        scores = _score(F.linear(x.float(), self.weight.float()), self.scoring_func)
        topk_idx = self.choose(scores)
        weights = scores.gather(1, topk_idx)
        return scores, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling, topk_idx


class HashRouter(V4Router):
    """Hash routing: a frozen token id -> experts table picks the experts; the learned scores weight them.
    The token ids of the current batch are handed over in `token_ids` [N] by the MoE layer."""

    def __init__(self, config: ModelConfigV4):
        super().__init__(config)
        del self.e_score_correction_bias  # a fixed table needs no balancing
        self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))
        self.token_ids: torch.Tensor | None = None

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        return self.tid2eid[self.token_ids]


class ClampedMLP(MLP):
    """V4's SwiGLU with clamped pre-activations: gate <= limit, |up| <= limit."""

    def __init__(self, hidden_size: int, intermediate_size: int, limit: float):
        super().__init__(hidden_size, intermediate_size)
        self.limit = limit

    def forward(self, x):
        gate, up = self.gate_proj(x).clamp(max=self.limit), self.up_proj(x).clamp(-self.limit, self.limit)
        return self.down_proj(F.silu(gate) * up)


class V4MoE(MoE):
    """daulat's MoE (stacked experts, grouped GEMM) with V4's routers, clamp and one shared expert."""

    def __init__(self, config: ModelConfigV4, layer_idx: int):
        super().__init__(config)
        self.is_hash = config.mlp_layer_types[layer_idx] == "hash_moe"
        self.gate = HashRouter(config) if self.is_hash else V4Router(config)
        self.swiglu_limit = config.swiglu_limit
        # transformers' shared expert is one MLP of moe_intermediate_size whatever n_shared_experts says
        self.shared_experts = ClampedMLP(config.hidden_size, config.moe_intermediate_size, config.swiglu_limit)

    def _chosen_experts(self, flat, weights, topk_idx):
        """flat [N, D] (a few tokens), weights and topk_idx [N, K] -> the routed output [N, D], each
        token through its K chosen experts only, clamped like the grouped path (MoE's decode route)."""
        gate, up = torch.einsum("nd,nkjd->nkj", flat, self.gate_up_proj[topk_idx]).chunk(2, dim=-1)
        gate, up = gate.clamp(max=self.swiglu_limit), up.clamp(-self.swiglu_limit, self.swiglu_limit)
        out = torch.einsum("nki,nkdi->nkd", F.silu(gate) * up, self.down_proj[topk_idx])  # [N, K, D]
        return (out * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], input_ids [B, T] -> [B, T, D]."""
        if self.is_hash:
            self.gate.token_ids = input_ids.reshape(-1)
        try:
            return super().forward(x)
        finally:
            self.gate.token_ids = None


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class V4Block(nn.Module):
    def __init__(self, config: ModelConfigV4, layer_idx: int):
        super().__init__()
        self.self_attn = V4Attention(config, layer_idx)
        self.mlp = V4MoE(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_hc = HyperConnection(config)
        self.ffn_hc = HyperConnection(config)

    def forward(self, streams, input_ids, rope, start=0, cache=None):
        """streams [B, T, n, D] at positions start..start+T-1 -> [B, T, n, D]."""
        post, comb, x = self.attn_hc(streams)
        streams = mix_streams(streams, self.self_attn(self.input_layernorm(x), rope, start, cache), post, comb)
        post, comb, x = self.ffn_hc(streams)
        return mix_streams(streams, self.mlp(self.post_attention_layernorm(x), input_ids), post, comb)


class V4MTPModule(nn.Module):
    """Multi-token prediction depth k, DeepSeek-V4's form of V3's (daulat.model.MTPModule): the
    previous depth's n streams (the main model's before its hc_head, at depth 1), each normed by
    hnorm and projected by h_proj, plus e_proj of the normed embedding of token i+k, run through one
    more V4 block (sliding-window attention, learned routing) and collapsed by this module's own
    hc_head; the final norm is its own, the embedding and output head are the main model's.
    e_proj and h_proj are V3's eh_proj cut in two ([e | h] halves), because the hidden side is
    applied to each of the n streams while the embedding is added to all of them."""

    def __init__(self, config: ModelConfigV4, layer_idx: int):
        super().__init__()
        D = config.hidden_size
        self.enorm, self.hnorm = RMSNorm(D, config.rms_norm_eps), RMSNorm(D, config.rms_norm_eps)
        self.e_proj, self.h_proj = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
        self.block = V4Block(_mtp_block_config(config), layer_idx)
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(D, config.rms_norm_eps)

    def forward(self, streams, emb_next, input_ids_next, rope):
        """streams [B, T, n, D], emb_next [B, T, D] (the embeddings of input_ids_next [B, T], tokens
        i+k) -> this depth's streams [B, T, n, D] at positions 0..T-1 (the next depth's input)."""
        x = self.h_proj(self.hnorm(streams)) + self.e_proj(self.enorm(emb_next)).unsqueeze(2)
        return self.block(x, input_ids_next, rope)


def _mtp_block_config(config: ModelConfigV4) -> ModelConfigV4:
    """The config an MTP block at layer index L + k reads its kinds from: V4's MTP layer has no
    compressor (compress ratio 0, a sliding-window layer) and a learned router (no tid2eid)."""
    extended = copy.copy(config)
    D = config.num_nextn_predict_layers
    extended.layer_types = config.layer_types + ["sliding_attention"] * D
    extended.mlp_layer_types = config.mlp_layer_types + ["moe"] * D
    return extended


def _rotary(config: ModelConfigV4, theta: float, scaling: dict | None) -> Rotary:
    inv_freq, factor = rope_frequencies(SimpleNamespace(qk_rope_head_dim=config.qk_rope_head_dim,
                                                        rope_theta=theta, rope_scaling=scaling))
    return Rotary(inv_freq, factor)


class DeepseekV4(nn.Module):
    """Causal LM over n residual streams: `model(input_ids [B, T]) -> logits [B, T, V]`."""

    def __init__(self, config: ModelConfigV4):
        super().__init__()
        self.config = config
        D, V = config.hidden_size, config.vocab_size
        self.embed_tokens = nn.Embedding(V, D)
        self.layers = nn.ModuleList(V4Block(config, i) for i in range(config.num_hidden_layers))
        self.hc_head = HyperHead(config)  # the streams collapse into one before the final norm
        self.norm, self.lm_head = RMSNorm(D, config.rms_norm_eps), nn.Linear(D, V, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # MTP modules after the main stack (numbered L + k, as DeepSeek-V3's); with none, the main
        # model's parameters and their initialisation are unchanged
        self.mtp = nn.ModuleList(V4MTPModule(config, config.num_hidden_layers + k)
                                 for k in range(config.num_nextn_predict_layers))
        self.rope_main = _rotary(config, config.rope_theta, None)
        self.rope_compress = _rotary(config, config.compress_rope_theta, config.rope_scaling)
        for layer in self.layers:
            layer.self_attn.train_indexer = config.indexer_loss_weight > 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) matrices, output projections scaled by 1/sqrt(2L); norms one;
        sinks, biases and position biases zero; each token hashed to K distinct experts."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith(("hc_scale", "hc.scale")):
                nn.init.ones_(p)
            elif name.endswith(("sinks", "base", "hc_base", "position_bias")):
                nn.init.zeros_(p)
            elif name.endswith(("o_b_proj.weight", "down_proj.weight", "down_proj")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)
        E, K = self.config.n_routed_experts, self.config.num_experts_per_tok
        for moe in self.moe_layers():
            if moe.is_hash:
                tokens = torch.arange(self.config.vocab_size, device=moe.gate.tid2eid.device)
                moe.gate.tid2eid.copy_((tokens[:, None] * 7 + torch.arange(K, device=tokens.device) * (E // K)) % E)
            else:
                moe.gate.e_score_correction_bias.zero_()

    def _apply(self, fn, recurse=True):
        """Casts (`.to(torch.bfloat16)`, `.half()`) leave FP32_TENSORS in float32; moves still move them.
        The float32 values are held as `.data` (a cast swaps a Parameter's data, not the Parameter),
        so that they come back exactly, not rounded through the cast's dtype."""
        kept = {name: t.data for name, t in [*self.named_parameters(), *self.named_buffers()]
                if any(key in "." + name for key in FP32_TENSORS) and t.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            if name in kept and t.dtype != torch.float32:
                t.data = kept[name].data.to(device=t.device, dtype=torch.float32)
        return self

    def reset_buffers(self, device=None) -> None:
        """Recompute on `device` what no checkpoint holds (the two RoPE tables, the experts' load
        counters): for a model whose weights were loaded into a build on the meta device."""
        config = self.config
        self.rope_main = _rotary(config, config.rope_theta, None).to(device)
        self.rope_compress = _rotary(config, config.compress_rope_theta, config.rope_scaling).to(device)
        for moe in self.moe_layers():
            moe.tokens_per_expert = torch.zeros(moe.n_experts, device=device)

    def moe_layers(self) -> list[V4MoE]:
        """The MoE of every block, the MTP blocks' last (as V3's: they are balanced alike)."""
        return [layer.mlp for layer in self.layers] + [module.block.mlp for module in self.mtp]

    # V3's count reads the same names (embed_tokens, lm_head, layers[i].mlp, mtp.*): total or active per token
    num_parameters = DeepseekV3.num_parameters

    def _trunk(self, input_ids: torch.Tensor, layer_caches: list[LayerCache] | None = None,
               start: int = 0) -> torch.Tensor:
        """input_ids [B, T] at positions start..start+T-1 -> the collapsed hidden states [B, T, D].
        layer_caches: one sequence's per-layer decode state."""
        return self.hc_head(self._streams(input_ids, layer_caches, start))

    def _streams(self, input_ids: torch.Tensor, layer_caches: list[LayerCache] | None = None,
                 start: int = 0) -> torch.Tensor:
        """The trunk before its collapse: input_ids [B, T] -> the n streams after the last block [B, T, n, D]."""
        x = self.embed_tokens(input_ids)
        streams = x.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()  # [B, T, n, D]
        for i, layer in enumerate(self.layers):
            rope = self.rope_main if layer.self_attn.compressor is None else self.rope_compress
            streams = layer(streams, input_ids, rope, start, None if layer_caches is None else layer_caches[i])
        return streams

    def hidden_states(self, input_ids, positions=None, cache=None):
        """The trunk: input_ids [B, T] -> hidden states before the final norm [B, T, D].

        Without a cache the tokens are a whole sequence from position 0. With one (see make_cache),
        positions [B, T] are required and must continue each row's sequence: batch row b, cache row
        r = cache.rows[b], at cache.lengths[r] + 0..T-1. Rows sit at their own positions (the
        engine's slots), each with its own windows and entries; the rows at one position run through
        the layers as one batch (their states stacked for the call, then split back into views).
        """
        T = input_ids.shape[1]
        steps = torch.arange(T, device=input_ids.device)
        if cache is None:
            if positions is not None and not bool((positions == steps).all()):
                raise ValueError(f"DeepSeek-V4 positions must be 0..{T - 1} without a cache")
            return self._trunk(input_ids)
        rows = range(input_ids.shape[0]) if cache.rows is None else [int(r) for r in cache.rows]
        groups: dict[int, list[int]] = {}  # rows at one length run as one batch, their states stacked
        for b, row in enumerate(rows):
            start = cache.lengths[row]
            if positions is None or not bool((positions[b] == start + steps).all()):
                raise ValueError(f"DeepSeek-V4 positions must be {start}..{start + T - 1} for cache row {row} "
                                 "(each row's cache is filled in order)")
            groups.setdefault(start, []).append(b)
        hidden: list = [None] * len(rows)
        for start, members in groups.items():
            slots = [cache.slots[rows[b]] for b in members]
            states = slots[0] if len(members) == 1 else [stack_states(list(layer)) for layer in zip(*slots)]
            out = self._trunk(input_ids[members], states, start)
            if len(members) > 1:  # each row keeps its views of the stacked tensors
                split = [split_states(layer, [1] * len(members)) for layer in states]
                for j, b in enumerate(members):
                    cache.slots[rows[b]] = [layer[j] for layer in split]
            for j, b in enumerate(members):
                hidden[b] = out[j : j + 1]
                cache.lengths[rows[b]] += T
        return torch.cat(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden states [..., D] (from hidden_states) -> logits [..., V]."""
        return self.lm_head(self.norm(hidden))

    def forward(self, input_ids, positions=None, cache=None):
        """input_ids [B, T] (LongTensor) -> logits [B, T, V]; positions and cache as in hidden_states."""
        return self.logits(self.hidden_states(input_ids, positions, cache))

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> "V4Cache":
        """An empty decode cache for batch_size rows (its tensors are made as tokens arrive)."""
        element = torch.empty((), dtype=dtype or self.embed_tokens.weight.dtype).element_size()
        return V4Cache(self.config, batch_size, max_len, element)

    def training_loss(self, input_ids, targets, ignore_index: int = -100):
        """Next-token cross-entropy plus the MTP, balance and indexer terms that are switched on.

        input_ids, targets [B, T]. Returns (loss, stats) where stats holds detached values: ce, mtp
        (as V3's: the mean over depths, weighted by mtp_loss_weight in the loss), balance, indexer
        (the mean KL of the CSA indexers to their layers' attention).
        """
        streams = self._streams(input_ids)
        h = self.hc_head(streams)
        ce = linear_cross_entropy(self.norm(h).flatten(0, 1), self.lm_head.weight, targets.flatten(), ignore_index)
        loss, stats = ce, {"ce": ce.detach()}
        mtp = self.mtp_loss(streams, input_ids, targets, ignore_index)
        if mtp is not None:
            loss, stats["mtp"] = loss + self.config.mtp_loss_weight * mtp, mtp.detach()
        balance = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if balance:
            balance_loss = torch.stack(balance).sum()
            loss, stats["balance"] = loss + balance_loss, balance_loss.detach()
        kl = [layer.self_attn.indexer_loss for layer in self.layers if layer.self_attn.indexer_loss is not None]
        for layer in self.layers:
            layer.self_attn.indexer_loss = None  # never a stale one in the next step
        if kl:
            indexer_loss = torch.stack(kl).mean()
            loss, stats["indexer"] = loss + self.config.indexer_loss_weight * indexer_loss, indexer_loss.detach()
        return loss, stats

    mtp_loss = DeepseekV3.mtp_loss  # V3's loop over the depths, each through mtp_depth

    def mtp_depth(self, module: V4MTPModule, k: int, streams: torch.Tensor, input_ids: torch.Tensor):
        """MTP depth k: the previous depth's streams [B, >= T-k, n, D] and input_ids[:, k:] -> (this
        depth's streams [B, T-k, n, D], their collapse through its hc_head and final norm [B, T-k, D])."""
        T = input_ids.shape[1]
        nxt = input_ids[:, k:]
        streams = module(streams[:, : T - k], self.embed_tokens(nxt), nxt, self.rope_main)
        return streams, module.norm(module.hc_head(streams))

    @torch.no_grad()
    def update_router_bias(self, gamma: float) -> list[torch.Tensor]:
        """Auxiliary-loss-free balancing of the learned routers (hash layers have nothing to balance):
        call after each optimizer step with the bias speed (train.bias_update_speed); returns each
        such layer's expert load since the last call."""
        return [moe.update_bias(gamma) for moe in self.moe_layers() if not moe.is_hash]


class V4Cache:
    """DeepSeek-V4's decode state: for each of batch_size rows, one LayerCache per layer (the sliding
    window's last W - 1 keys, and for compressed layers the compressor's and CSA's indexer's partial
    window and entries). Unlike a full K/V cache it grows by one entry per m tokens, not per token,
    beyond the fixed window; its tensors are made as tokens arrive.

    The engine's interface (see daulat.model.LatentCache): `rows` (the cache rows of the next
    forward's batch rows; None: 0..B-1), `copy_rows`, `bytes_per_token`, `batch_size`, `max_len`.
    """

    exact_lengths = True  # every token a row is fed becomes state: prompts are never padded (the engine's runner)

    def __init__(self, config: ModelConfigV4, batch_size: int, max_len: int, bytes_per_number: int = 4):
        self.batch_size, self.max_len = batch_size, max_len
        self.slots = [[LayerCache() for _ in range(config.num_hidden_layers)] for _ in range(batch_size)]
        self.lengths = [0] * batch_size  # tokens each row holds
        self.rows: list[int] | torch.Tensor | None = None
        self._per_token = kv_cache_bytes_per_token_v4(config, bytes_per_number)["v4"]

    def reset_rows(self, rows: list[int]) -> None:
        """Empty these rows (a new sequence is prefilled into them from position 0)."""
        for row in rows:
            self.slots[row] = [LayerCache() for _ in self.slots[row]]
            self.lengths[row] = 0

    def copy_rows(self, source: int, targets: list[int], length: int) -> None:
        """Give each target row the state of source's first `length` tokens: a prompt prefilled once
        for several samples. Only the whole of what source holds can be copied (windows and pooled
        entries cannot be cut back to an earlier position)."""
        if length != self.lengths[source]:
            raise ValueError(f"cache row {source} holds {self.lengths[source]} tokens, cannot copy its first {length}")
        for target in targets:
            self.slots[target] = copy.deepcopy(self.slots[source])
            self.lengths[target] = length

    def bytes(self) -> int:
        """Bytes the cache holds now, over all layers and rows."""
        return sum(t.numel() * t.element_size() for slot in self.slots for layer in slot for t in layer.tensors())

    def bytes_per_token(self) -> float:
        """What the cache grows by per token once past the window (by formula, in its dtype)."""
        return self._per_token


def kv_cache_bytes_per_token_v4(config: ModelConfigV4, bytes_per_number: int = 2) -> dict:
    """What the decode cache grows by per token over all layers, once past the window (which stays at
    W - 1 keys per layer): d/m per CSA layer plus its indexer's c_I/m, d/m' per HCA layer; against
    full per-head K and V (2 H d per layer)."""
    per_token = 0.0
    for kind in config.layer_types:
        if kind == "compressed_sparse_attention":
            per_token += (config.head_dim + config.index_head_dim) / config.compress_rates[kind]
        elif kind == "heavily_compressed_attention":
            per_token += config.head_dim / config.compress_rates[kind]
    v4 = per_token * bytes_per_number
    mha = config.num_hidden_layers * 2 * config.num_attention_heads * config.head_dim * bytes_per_number
    return {"v4": v4, "mha": mha, "saving": 1 - v4 / mha}


# ------------------------------------------------------------------------------------------------
# Checkpoint tensor names
# ------------------------------------------------------------------------------------------------
#
# On disk a DeepSeek-V4 checkpoint uses DeepSeek's published names (`layers.0.attn.wq_a.weight`,
# per-expert `ffn.experts.3.w1.weight`, ...), which transformers' `from_pretrained` converts to its
# module names (`model.layers.0.self_attn.q_a_proj.weight`, fused `mlp.experts.gate_up_proj`).
# The mapping is per tensor, so that daulat/checkpoint.py can stream a checkpoint through it:
# `checkpoint_key_v4` names where a daulat tensor is written, `checkpoint_target_v4` where a checkpoint
# tensor is read into (either spelling, with or without the "model." prefix, which transformers'
# save_pretrained mixes). to_hf_state_dict_v4 / from_hf_state_dict_v4 apply them to a whole state dict.
# MTP module k is written under the published `mtp.{k}.` prefix (DeepSeek-V4's release holds
# `mtp.0.e_proj.weight`, `mtp.0.hc_head_fn`, `mtp.0.attn.wq_a.weight`, `mtp.0.ffn.experts.3.w1.weight`,
# ...): its block's tensors named as a layer's, its own as below. transformers reads none of them
# (DeepseekV4ForCausalLM ignores `mtp.*` on load); daulat keeps them in mtp.safetensors.

_TOP_NAMES = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight", "norm.weight": "norm.weight",
              "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}
_COMPRESSOR_NAMES = {"kv_proj.weight": "wkv.weight", "gate_proj.weight": "wgate.weight", "position_bias": "ape",
                     "kv_norm.weight": "norm.weight"}
_LAYER_NAMES = {  # daulat's name inside layers.{i}. -> the published one
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"{hc}_hc.{p}": f"hc_{hc}_{p}" for hc in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "self_attn.q_a_proj.weight": "attn.wq_a.weight", "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight", "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.norm.weight", "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight", "self_attn.sinks": "attn.attn_sink",
    **{f"self_attn.compressor.{k}": f"attn.compressor.{v}" for k, v in _COMPRESSOR_NAMES.items()},
    **{f"self_attn.compressor.indexer.{k}": f"attn.indexer.compressor.{v}" for k, v in _COMPRESSOR_NAMES.items()},
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight", "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid", "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
}
# transformers' module names that differ from daulat's (inside layers.{i}.); its fused experts are
# daulat's stacked ones, [E, 2I, D] and [E, D, I]
_TRANSFORMERS_NAMES = {"mlp.experts.gate_up_proj": "mlp.gate_up_proj", "mlp.experts.down_proj": "mlp.down_proj",
                       "self_attn.compressor.indexer.scorer.weights_proj.weight":
                       "self_attn.compressor.indexer.weights_proj.weight"}
# an MTP module's own tensors (inside mtp.{k}.; the rest are its block's, named as a layer's)
_MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "e_proj.weight": "e_proj.weight",
              "h_proj.weight": "h_proj.weight", "norm.weight": "norm.weight",
              **{k: v for k, v in _TOP_NAMES.items() if k.startswith("hc_head.")}}
_FROM_TOP = {v: k for k, v in _TOP_NAMES.items()}
_FROM_LAYER = {v: k for k, v in _LAYER_NAMES.items()} | _TRANSFORMERS_NAMES
_FROM_MTP = {v: k for k, v in _MTP_NAMES.items()}
# a layer's tensor, daulat's or a checkpoint's (group 1: the layer); one routed expert's (layer, expert, w);
# an MTP module's (group 1: its depth k, from 0)
LAYER_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
EXPERT_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
MTP_KEY = re.compile(r"^(?:model\.)?mtp\.(\d+)\.(.+)$")
_EXPERT_IN_LAYER = re.compile(r"^ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_EXPERT_HALF = {"w1": 0, "w3": 1, "w2": None}  # the gate rows, the up rows of gate_up_proj; down_proj


def checkpoint_key_v4(name: str, expert: int | None = None, half: int | None = None) -> str:
    """The published checkpoint key of a daulat tensor; for the stacked experts, of one expert's
    slice (`half` 0: w1, the gate rows of gate_up_proj; 1: w3, the up rows; down_proj: w2)."""
    layer = LAYER_KEY.match(name)
    if layer is not None:
        return f"layers.{layer[1]}.{_key_in_layer(layer[2], expert, half)}"
    mtp = MTP_KEY.match(name)
    if mtp is not None:
        rest = mtp[2]
        inner = _key_in_layer(rest[len("block."):], expert, half) if rest.startswith("block.") else \
            _MTP_NAMES.get(rest, rest)
        return f"mtp.{mtp[1]}.{inner}"
    return _TOP_NAMES.get(name, name)


def _key_in_layer(rest: str, expert: int | None, half: int | None) -> str:
    """A block's tensor (daulat's name inside layers.{i}.) -> its published name inside the layer."""
    if rest in ("mlp.gate_up_proj", "mlp.down_proj"):
        w = "w2" if rest == "mlp.down_proj" else ("w1", "w3")[half or 0]
        return f"ffn.experts.{expert or 0}.{w}.weight"
    return _LAYER_NAMES.get(rest, rest)


def checkpoint_target_v4(key: str) -> tuple[str, int | None, int | None]:
    """(daulat name, expert, half) that a checkpoint tensor fills: one expert's slice of a stacked
    parameter (half as in checkpoint_key_v4), or the whole of it (None, None). An MTP module's copy of
    the shared embedding or head (`mtp.{k}.emb.*`, `mtp.{k}.head.*`, as some releases carry) is read
    past (name ""); an unknown name passes through unchanged for the caller to report."""
    name = key.removeprefix("model.")
    layer = LAYER_KEY.match(name)
    if layer is not None:
        inner, expert, half = _target_in_layer(layer[2])
        return f"layers.{layer[1]}.{inner}", expert, half
    mtp = MTP_KEY.match(name)
    if mtp is None:
        return _FROM_TOP.get(name, name), None, None
    rest = mtp[2]
    if rest.startswith(("emb.", "embed.", "head.")):
        return "", None, None
    if rest in _FROM_MTP:
        return f"mtp.{mtp[1]}.{_FROM_MTP[rest]}", None, None
    inner, expert, half = _target_in_layer(rest)
    return f"mtp.{mtp[1]}.block.{inner}", expert, half


def _target_in_layer(rest: str) -> tuple[str, int | None, int | None]:
    """A checkpoint tensor's name inside a layer -> (daulat's name inside the block, expert, half)."""
    expert = _EXPERT_IN_LAYER.match(rest)
    if expert is not None:
        kind = "down_proj" if expert[2] == "w2" else "gate_up_proj"
        return f"mlp.{kind}", int(expert[1]), _EXPERT_HALF[expert[2]]
    return _FROM_LAYER.get(rest, rest), None, None


def to_hf_state_dict_v4(model: DeepseekV4) -> dict[str, torch.Tensor]:
    """daulat's state dict under DeepSeek-V4's published checkpoint names (experts one by one), which
    `DeepseekV4ForCausalLM.from_pretrained` reads (MTP modules', `mtp.*`, included: it ignores them)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied to the embedding; not stored
        if not name.endswith(("mlp.gate_up_proj", "mlp.down_proj")):
            out[checkpoint_key_v4(name)] = tensor
            continue
        for e, weight in enumerate(tensor):  # [2I, D] gate rows first, or [D, I]
            halves = weight.chunk(2, dim=0) if name.endswith("gate_up_proj") else (weight,)
            for half, rows in enumerate(halves):
                out[checkpoint_key_v4(name, e, half)] = rows
    return out


def from_hf_state_dict_v4(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published or transformers names -> daulat's, experts stacked (MTP modules' too); an unknown name
    passes through for a strict load to report."""
    out, experts = {}, {}
    for key, tensor in tensors.items():
        name, expert, half = checkpoint_target_v4(key)
        if expert is not None:
            experts.setdefault(name, {})[(expert, half)] = tensor
        elif name:
            out[name] = tensor
    for name, pieces in experts.items():
        halves = (0, 1) if name.endswith("gate_up_proj") else (None,)
        wanted = [(e, h) for e in range(1 + max(e for e, _ in pieces)) for h in halves]
        missing = [checkpoint_key_v4(name, e, h) for e, h in wanted if (e, h) not in pieces]
        if missing:
            raise ValueError(f"missing tensor {missing[0]!r}")
        out[name] = torch.stack([torch.cat([pieces[(e, h)] for h in halves]) for e, _ in wanted[:: len(halves)]])
    return out
