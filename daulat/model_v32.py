"""DeepSeek-V3.2: DeepSeek-V3 plus DeepSeek Sparse Attention (the lightning indexer), in one file.

Semantics match transformers' `deepseek_v32` model, so checkpoints load both ways. Everything but the
attention is DeepSeek-V3's and comes from daulat/model.py unchanged (RMSNorm, RoPE, the MoE with its
router and grouped experts, the blocks, the loss):

    Block = x + SparseMLA(RMSNorm(x)); x + FFN(RMSNorm(x))
    SparseMLA = MLA whose queries each attend only to the `index_topk` earlier keys that the
                lightning indexer scores highest, gathered (never a masked dense [T, S] matrix)

The lightning indexer (DeepSeek-V3.2 report, section 2.1), for query t and key s:

    q_I[t, j] = wq_b(q_resid[t])_j     k_I[s] = LayerNorm(wk(x[s]))      (j = 1..h indexer heads)
    I[t, s]   = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s] / sqrt(d))      w = weights_proj(x) / sqrt(h), fp32

with the first r dims of q_I and k_I rotated by RoPE in halves (not interleaved, unlike MLA's), and
q_resid = q_a_layernorm(q_a_proj(x)) the low-rank query MLA already computes (so V3.2 needs
q_lora_rank). Each query keeps the top-k keys s <= t by I; with k >= T that is every earlier key and
the attention is V3's dense causal one. Decoding goes through `IndexedLatentCache` (`model.make_cache`),
which keeps the indexer's key beside MLA's latent: c + r + d numbers per token per layer.

Shapes: B batch, T tokens, S keys, H attention heads, h indexer heads, d = index_head_dim,
K = min(index_topk, S) selected keys, c = kv_lora_rank, n/r/v as in daulat/model.py.

Checkpoints: the tensor names are DeepSeek-V3's plus, per layer,
`model.layers.{i}.self_attn.indexer.{wq_b,wk,weights_proj}.weight` and `...indexer.k_norm.{weight,bias}`,
so daulat/checkpoint.py's `to_hf_state_dict` / `from_hf_state_dict` map them unchanged; the config is
`DeepseekV32Config.to_hf_dict` / `from_hf_dict` (daulat.architectures and daulat/checkpoint.py pick
the architecture a config or config.json names), and `KEEP_FP32` lists the tensors kept in float32 whatever the load
dtype (as transformers keeps them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from daulat.model import MLA, Block, DeepseekV3, LatentCache, ModelConfig, applied_weight, apply_rope
from daulat.model import kv_cache_bytes_per_token as v3_kv_cache_bytes_per_token

# tensors kept in float32 at any load dtype: the router's correction bias and the indexer's head weights
KEEP_FP32 = ("e_score_correction_bias", "indexer.weights_proj.weight")

# numbers (float32) one chunk of queries may hold at once in the sparse path: index scores, gathered
# latents, attention probabilities; bounds memory at long context (about 64 MiB)
CHUNK_NUMBERS = 1 << 24


@dataclass
class DeepseekV32Config(ModelConfig):
    """ModelConfig plus the lightning indexer, named as in transformers' `DeepseekV32Config`."""

    model_type: ClassVar[str] = "deepseek_v32"

    q_lora_rank: int | None = 64  # required: the indexer's queries are read from the low-rank query
    index_topk: int = 2048  # k: keys each query attends to
    index_n_heads: int = 64  # h
    index_head_dim: int = 128  # d (its first qk_rope_head_dim dims carry RoPE)

    def validate(self) -> None:
        super().validate()

        def bad(name, why):
            raise ValueError(f"config field {name!r} = {getattr(self, name)!r}: {why}")

        if self.q_lora_rank is None:
            bad("q_lora_rank", "DeepSeek-V3.2 needs a low-rank query (its indexer reads it)")
        for name in ["index_topk", "index_n_heads", "index_head_dim"]:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(name, "must be a positive integer")
        if self.index_head_dim < self.qk_rope_head_dim:
            bad("index_head_dim", f"must be at least qk_rope_head_dim ({self.qk_rope_head_dim}): RoPE rotates "
                                  "its first qk_rope_head_dim dims")
        if not self.rope_interleave:
            bad("rope_interleave", "DeepSeek-V3.2's attention rotates interleaved pairs; there is no other layout")
        if self.num_nextn_predict_layers:
            bad("num_nextn_predict_layers", "multi-token prediction is not implemented for DeepSeek-V3.2 yet")

    def to_hf_dict(self) -> dict:
        """The config.json that transformers' `DeepseekV32Config` reads (daulat's extra keys included)."""
        d = super().to_hf_dict()
        d.pop("rope_interleave")  # always interleaved in V3.2: transformers' config has no such field
        d.update(model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"])
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "DeepseekV32Config":
        """Read a `deepseek_v32` config.json written by daulat or transformers."""
        if d.get("model_type") != "deepseek_v32":
            raise ValueError(f"config field 'model_type' = {d.get('model_type')!r}: expected 'deepseek_v32'")
        layers, dense = d.get("num_hidden_layers", 0), d.get("first_k_dense_replace", 0)
        mlp_layer_types = d.get("mlp_layer_types")
        if mlp_layer_types is not None and mlp_layer_types != ["dense"] * dense + ["sparse"] * (layers - dense):
            raise ValueError(f"config field 'mlp_layer_types' = {mlp_layer_types!r}: daulat supports "
                             "first_k_dense_replace dense layers followed by MoE layers only")
        return super().from_hf_dict({**d, "model_type": "deepseek_v3"})


class Indexer(nn.Module):
    """The lightning indexer: a small multi-head scorer of which keys each query should attend to."""

    def __init__(self, config: DeepseekV32Config):
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim, self.topk = config.qk_rope_head_dim, config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.scale = self.head_dim**-0.5

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE in halves on the first r dims of x [B, T, h, d]; the other d - r dims pass unrotated."""
        rotated, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(rotated, cos, sin, interleave=False), rest], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The one key per token: x [B, S, D], cos/sin [B, S, 1, r/2] -> k_I [B, S, d]."""
        return self._rotate(self.k_norm(self.wk(x)).unsqueeze(2), cos, sin).squeeze(2)

    def forward(self, x, q_resid, cos, sin, keys):
        """Index scores I [B, T, S] (float32) of queries x [B, T, D] with q_resid [B, T, q_lora_rank] and
        cos/sin [B, T, 1, r/2] against keys [B, S, d]. No causal mask: the caller applies it."""
        B, T, _ = x.shape
        S = keys.shape[1]
        q = self._rotate(self.wq_b(q_resid).view(B, T, self.n_heads, self.head_dim), cos, sin)
        with torch.autocast(x.device.type, enabled=False):  # float32 even in bf16 training
            # all T*h query heads against the keys in one product: [B, T*h, d] @ [B, d, S] -> [B, T, h, S]
            scores = torch.matmul(q.float().reshape(B, T * self.n_heads, -1), keys.float().transpose(1, 2))
            scores = scores.view(B, T, self.n_heads, S).relu_()
            # the softmax scale is positive, so it passes through the ReLU into the head weights
            weights = F.linear(x.float(), self.weights_proj.weight.float()) * (self.n_heads**-0.5 * self.scale)
            return torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)  # heads weighted and summed: [B, T, S]


class SparseMLA(MLA):
    """MLA (daulat/model.py) whose queries attend to the keys their indexer selects.

    The selected keys' latents are gathered and attention runs in latent space (kv_b_proj folded into
    the query and the output, as MLA's absorbed path): attention costs O(k) per query, not O(S); only
    the indexer, with its few small heads, scores all S keys.
    """

    def __init__(self, config: DeepseekV32Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.indexer = Indexer(config)
        self.indexer_mode: str | None = None  # set through DeepseekV32.indexer_mode
        self.indexer_loss: torch.Tensor | None = None  # the last training forward's KL (indexer_mode set)

    def forward(self, x, cos, sin, positions=None, cache=None, absorb=None, rotation=None):
        """x [B, T, D], or [B, D] for one new token per sequence (decoding); cos/sin [B, T, 1, r/2];
        positions [B, T]; cache: an IndexedLatentCache (its `begin` has run). Returns x's shape.
        `absorb` and `rotation` are MLA's: the sparse path always attends in latent space."""
        shape = x.shape
        x = x[:, None] if x.dim() == 2 else x
        B, T, _ = x.shape
        H, c = self.n_heads, self.kv_lora_rank
        q_resid = self.q_a_layernorm(self.q_a_proj(x))  # [B, T, q_lora_rank]: shared with the indexer
        q_nope, q_pe = self.q_b_proj(q_resid).view(B, T, H, self.nope + self.rope).split([self.nope, self.rope], -1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)  # [B, T, H, r]
        kv_latent, k_pe = self.kv_a_proj_with_mqa(x).split([c, self.rope], dim=-1)
        kv_latent = self.kv_a_layernorm(kv_latent)  # [B, T, c]
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)  # [B, T, r]
        training_indexer = self.indexer_mode is not None and self.training and cache is None
        if cache is None and self.indexer.topk >= T and not training_indexer:  # every earlier key kept: V3's attention
            out = self._expanded(q_nope, q_pe, kv_latent, k_pe, None, causal=True)
            return self.o_proj(out.reshape(*shape[:-1], H * self.v_dim))
        # the indexer only chooses keys: no gradient flows through top-k; when it trains (indexer_mode),
        # only its own KL loss reaches it, through inputs detached from the main model
        with torch.enable_grad() if training_indexer else torch.no_grad():
            index_keys = self.indexer.keys(x.detach(), cos, sin)  # [B, T, d]
        if cache is None:  # key s of the sequence is visible to query t when s <= t
            query_pos = torch.arange(T, device=x.device).expand(B, T)
        else:  # the key at cache index s has position s
            keys = cache.update(self.layer_idx, torch.cat([kv_latent, k_pe], dim=-1))  # [B, S, c + r]
            kv_latent, k_pe = keys[..., :c], keys[..., c:]
            index_keys = cache.update_indexer(self.layer_idx, index_keys)  # [B, S, d]
            query_pos = positions
        out = self._sparse(x, q_resid, cos, sin, q_nope, q_pe, kv_latent, k_pe, index_keys, query_pos, training_indexer)
        return self.o_proj(out.reshape(*shape[:-1], H * self.v_dim))

    def _sparse(self, x, q_resid, cos, sin, q_nope, q_pe, kv_latent, k_pe, index_keys, query_pos,
                training_indexer=False):
        """Top-k selection and attention over the gathered keys, a chunk of queries at a time.

        Queries: x [B, T, D], q_resid [B, T, q], q_nope [B, T, H, n], q_pe [B, T, H, r] at positions
        query_pos [B, T]; keys: kv_latent [B, S, c], k_pe [B, S, r], index_keys [B, S, d], key s at
        position s. Returns [B, T, H, v]. training_indexer: also set `self.indexer_loss`, the indexer's
        KL to the attention over the selected keys (over every earlier key in "warmup" mode).
        """
        B, T, _ = x.shape
        S = kv_latent.shape[1]
        K = S if self.indexer_mode == "warmup" and training_indexer else self.indexer.topk  # warm-up: dense
        w = applied_weight(self.kv_b_proj).view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w[:, : self.nope])  # [B, T, H, c]
        per_query = S * self.indexer.n_heads + K * (self.kv_lora_rank + self.rope + self.n_heads)
        chunk = max(1, CHUNK_NUMBERS // (B * per_query))
        out, kl = [], []
        for start in range(0, T, chunk):
            queries = slice(start, start + chunk)
            pos = query_pos[:, queries]  # [B, t]
            end = int(pos.max()) + 1  # keys after the chunk's last query are never needed
            index_args = (x[:, queries].detach(), q_resid[:, queries].detach(), cos[:, queries], sin[:, queries])
            with torch.no_grad():
                scores = self.indexer(*index_args, index_keys[:, :end])
                future = torch.arange(end, device=x.device) > pos[..., None]  # [B, t, end]
                selected = scores.masked_fill_(future, float("-inf")).topk(min(K, end), dim=-1).indices  # [B, t, K]
            # a query with fewer than K earlier keys also selected some later ones: they stay masked
            visible = selected <= pos[..., None]  # [B, t, K]
            args = (q_latent[:, queries], q_pe[:, queries], kv_latent, k_pe, selected, visible, training_indexer)
            if torch.is_grad_enabled():  # keep only the chunk's output for backward, not its gathered keys
                attended = checkpoint(self._attend_selected, *args, use_reentrant=False)
            else:
                attended = self._attend_selected(*args)
            out.append(attended[0])
            if training_indexer:  # the indexer's scores are recomputed in backward rather than kept
                with torch.enable_grad():
                    kl.append(checkpoint(self._indexer_kl, index_args, index_keys, selected, visible, attended[1],
                                         use_reentrant=False))
        with torch.enable_grad():  # the warm-up runs the main model under no_grad
            self.indexer_loss = torch.stack(kl).sum() / (B * T) if kl else None
        return torch.einsum("bthc,hvc->bthv", torch.cat(out, dim=1), w[:, self.nope :])  # [B, T, H, v]

    def _indexer_kl(self, index_args, index_keys, selected, visible, target):
        """Sum over queries of KL(target || softmax of the indexer's scores over the selected keys), the
        DeepSeek-V3.2 report's indexer loss: index_args the indexer's query inputs (detached), index_keys
        [B, S, d]; selected, visible [B, t, K]; target [B, t, K] the main attention summed over heads and
        L1-normalised."""
        end = int(selected.max()) + 1
        scores = self.indexer(*index_args, index_keys[:, :end]).gather(-1, selected)  # [B, t, K], with gradient
        log_q = scores.masked_fill(~visible, float("-inf")).log_softmax(dim=-1)
        return torch.where(visible, torch.xlogy(target, target) - target * log_q, 0.0).sum()

    def _attend_selected(self, q_latent, q_pe, kv_latent, k_pe, selected, visible, with_target=False):
        """Latent-space attention of q_latent [B, t, H, c] and q_pe [B, t, H, r] over the keys `selected`
        [B, t, K] (indices into kv_latent [B, S, c] and k_pe [B, S, r]), where `visible` [B, t, K].
        Returns (the attended latents [B, t, H, c], and with_target the attention over the selected
        keys summed over heads and L1-normalised [B, t, K] float32, without gradient; else None)."""
        B, t, K = selected.shape
        S, c = kv_latent.shape[1], self.kv_lora_rank
        rows = (selected + S * torch.arange(B, device=selected.device)[:, None, None]).flatten()
        keys = torch.cat([kv_latent, k_pe], dim=-1).flatten(0, 1)  # [B * S, c + r]: one gather for both
        gathered = keys.index_select(0, rows).view(B * t, K, c + self.rope)  # [B*t, K, c + r]
        queries = torch.cat([q_latent, q_pe], dim=-1).flatten(0, 1)  # [B*t, H, c + r]
        scores = torch.bmm(queries, gathered.transpose(1, 2)).view(B, t, self.n_heads, K)
        scores = scores.float().mul_(self.scale).masked_fill_(~visible[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)  # [B, t, H, K]
        target = None
        if with_target:
            target = probs.detach().sum(dim=2)
            target = target / target.sum(dim=-1, keepdim=True)
        out = torch.bmm(probs.to(q_latent.dtype).flatten(0, 1), gathered[..., :c])  # [B*t, H, c]
        return out.view(B, t, self.n_heads, c), target


class IndexedLatentCache(LatentCache):
    """The V3.2 decode cache: MLA's entries (LatentCache: latent and RoPE key [B, S_max, c + r] per
    layer) plus the indexer's key per token [B, S_max, d] per layer. The same interface as LatentCache,
    and `update_indexer` beside `update`."""

    def __init__(self, config: DeepseekV32Config, batch_size: int, max_len: int, device=None,
                 dtype=torch.float32):
        super().__init__(config, batch_size, max_len, device, dtype)
        self.index_keys = [torch.zeros(batch_size, max_len, config.index_head_dim, device=device, dtype=dtype)
                           for _ in range(config.num_hidden_layers)]

    def update_indexer(self, layer_idx: int, keys: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' indexer keys [B, T, d] where `begin` said; return the keys the batch
        sees [B, S, d]."""
        store = self.index_keys[layer_idx]
        store[self._write_rows, self._positions] = keys.to(store.dtype)
        return store[self._read_rows, : self._span]

    def copy_rows(self, source: int, targets: list[int], length: int) -> None:
        super().copy_rows(source, targets, length)
        if targets:
            rows = torch.tensor(targets, device=self.index_keys[0].device)
            for store in self.index_keys:
                store[rows, :length] = store[source, :length]

    def bytes_per_token(self) -> int:
        return super().bytes_per_token() + sum(t.shape[-1] * t.element_size() for t in self.index_keys)


class SparseBlock(Block):
    """DeepSeek-V3's block with the sparse attention."""

    attention_type = SparseMLA


class DeepseekV32(DeepseekV3):
    """Causal LM: `model(input_ids [B, T]) -> logits [B, T, V]`, DeepSeek-V3 with sparse attention."""

    block_type = SparseBlock

    def __init__(self, config: DeepseekV32Config):
        if not isinstance(config, DeepseekV32Config):
            raise TypeError(f"DeepseekV32 needs a DeepseekV32Config, got {type(config).__name__}")
        super().__init__(config)

    # -- training the indexer (DeepSeek-V3.2 report, section 2.1.1) ---------------------------------
    INDEXER_MODES = (None, "warmup", "sparse")

    @property
    def indexer_mode(self) -> str | None:
        """How `training_loss` trains the lightning indexers (in train mode; inference ignores it):

        None: not at all (as transformers: the indexer is a fixed selector); the loss is the LM loss.
        "warmup": the dense warm-up. Every query attends to all its earlier keys, the main model is
            frozen (no gradient, no router-bias updates), and the loss is the indexers' KL from the main
            attention's distribution (summed over heads, L1-normalised) to their softmaxed scores.
        "sparse": sparse training. Top-k attention; the loss is the LM loss plus the indexers' KL on
            the selected keys, the indexers' inputs detached: the LM loss trains the main model only,
            the KL the indexers only.
        """
        return self.layers[0].self_attn.indexer_mode

    @indexer_mode.setter
    def indexer_mode(self, mode: str | None) -> None:
        if mode not in self.INDEXER_MODES:
            raise ValueError(f"indexer_mode = {mode!r}: expected one of {self.INDEXER_MODES}")
        for layer in self.layers:
            layer.self_attn.indexer_mode = mode

    def indexer_loss(self) -> torch.Tensor | None:
        """The last training forward's indexer KL, averaged over layers and queries (None when no
        layer computed one)."""
        losses = [layer.self_attn.indexer_loss for layer in self.layers if layer.self_attn.indexer_loss is not None]
        return torch.stack(losses).mean() if losses else None

    def training_loss(self, input_ids, targets, ignore_index: int = -100):
        """DeepSeek-V3's loss (CE + MTP + balance) for indexer_mode None; the warm-up's indexer KL alone
        ("warmup", CE still reported); CE + ... + the KL on the selected keys ("sparse"). The KL is
        reported as stats["indexer_kl"]."""
        for layer in self.layers:
            layer.self_attn.indexer_loss = None
        if self.indexer_mode != "warmup":
            loss, stats = super().training_loss(input_ids, targets, ignore_index)
        else:
            with torch.no_grad():  # the main model is frozen: only the indexers' KL builds a graph
                loss, stats = super().training_loss(input_ids, targets, ignore_index)
        kl = self.indexer_loss()
        if kl is None:  # not in train mode, or no indexer_mode
            return loss, stats
        stats["indexer_kl"] = kl.detach()
        return (kl if self.indexer_mode == "warmup" else loss + kl), stats

    @torch.no_grad()
    def update_router_bias(self, gamma: float | None = None) -> list[torch.Tensor]:
        """DeepSeek-V3's bias balancing; during the indexer warm-up the router stays as it is."""
        return super().update_router_bias(0.0 if self.indexer_mode == "warmup" else gamma)

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> IndexedLatentCache:
        """The decode cache for `batch_size` sequences of up to `max_len` tokens; device and dtype
        default to the model's."""
        weight = self.embed_tokens.weight
        return IndexedLatentCache(self.config, batch_size, max_len, device=weight.device if device is None else device,
                                  dtype=weight.dtype if dtype is None else dtype)


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_number: int = 2) -> dict:
    """Decode-cache size per token over all layers, by formula, for V3 or V3.2: "latent" (MLA's c + r),
    "indexer" (V3.2's indexer key, d; 0 for V3), "total" (what the engine's cache holds), "mha" (full
    per-head K and V, the cache an uncompressed attention of the same shape would need) and "saving"."""
    kv = v3_kv_cache_bytes_per_token(config, bytes_per_number)
    indexer = 0
    if isinstance(config, DeepseekV32Config):
        indexer = config.num_hidden_layers * config.index_head_dim * bytes_per_number
    total = kv["mla"] + indexer
    return {"latent": kv["mla"], "indexer": indexer, "total": total, "mha": kv["mha"], "saving": 1 - total / kv["mha"]}


def from_transformers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory `DeepseekV32ForCausalLM.state_dict()` (fused experts) -> daulat's names.
    (On disk the experts are split per expert: daulat/checkpoint.py reads that layout for V3 and V3.2.)"""
    out = {}
    for key, tensor in state.items():
        name = key.removeprefix("model.").replace(".mlp.experts.gate_up_proj", ".mlp.gate_up_proj")
        out[name.replace(".mlp.experts.down_proj", ".mlp.down_proj")] = tensor
    return out
