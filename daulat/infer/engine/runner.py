"""The model runner: the model plus a fixed pool of latent-cache slots, and the two forward passes.

    prefill: prompts [B, T] right-padded -> the model's forward (expanded attention), latents written
             to the slots' rows of the cache through its cache protocol (`LatentCache.rows`)
    decode:  last tokens [B, 1] of any subset of slots -> absorbed attention against the cached latents

The cache (`SlotCache`, a `daulat.model.LatentCache`) is allocated once for `max_num_seqs` slots of
`max_model_len` tokens: per token and layer it holds only kv_lora_rank + qk_rope_head_dim numbers
(never per-head keys or values). Nothing the size of the cache is allocated after start-up.

Decoding has two implementations of the same absorbed attention. `decode_path="model"` calls the
model's own forward with the cache (`MLA._absorbed`). `decode_path="fast"` (the default) runs the
same arithmetic from the same parameters, written for one token per sequence: a token's latent and
RoPE key share one cache row, scored against [W_UK-absorbed query | rotated query] by one `bmm`;
RoPE is one small matmul per layer with a rotation built once per step; the batch's rows are read as
a view of the cache when its slots are consecutive; and a small batch runs only the experts it chose
rather than a grouped GEMM over all of them. On a CPU a decode step of a small model is mostly
per-operator overhead, and this halves it. Weights are read in place (views, nothing folded or
copied), so the fast path follows a model trained between generations (GRPO). Tests pin both paths
to the plain forward over a spread of configurations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from daulat.model import DeepseekV3, LatentCache, MoE


class ModelRunner:
    def __init__(self, model: DeepseekV3, max_num_seqs: int, max_model_len: int, decode_path: str = "fast"):
        if decode_path not in ("fast", "model"):
            raise ValueError(f"decode_path must be 'fast' or 'model', got {decode_path!r}")
        self.model = model.eval()
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.decode_path = decode_path
        _check_cache_fits(model.config, max_num_seqs, max_model_len, weight)
        self.cache = SlotCache(model.config, max_num_seqs, max_model_len, device=self.device, dtype=self.dtype)

    @property
    def cache_bytes_per_token(self) -> int:
        return self.cache.bytes_per_token()

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, D] at the positions whose next token is wanted -> float32 logits [B, V]."""
        norm = self.model.norm
        return torch.mm(_rms_norm(hidden, norm.weight, norm.eps), self.model.lm_head.weight.t()).float()

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Write the prompts' latents into `slots`; return the logits after each prompt's last token [B, V].

        Shorter prompts are right-padded; the padding writes latents past the prompt's end, which
        decode overwrites before any query can see them (a query at position p reads keys 0..p).
        """
        lengths = [len(p) for p in prompts]
        B, T = len(prompts), max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        positions = torch.arange(T, device=self.device).expand(B, T)
        self.cache.rows = self._long(slots)
        hidden = self.model.hidden_states(ids.to(self.device), positions, self.cache, absorb=False)  # [B, T, D]
        last = hidden[torch.arange(B, device=self.device), self._long(lengths) - 1]  # [B, D]
        return self._logits(last)

    def decode(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """One token for each of B sequences: tokens/positions/slots [B] -> logits [B, V]."""
        if self.decode_path == "model":
            self.cache.rows = self._long(slots)
            hidden = self.model.hidden_states(self._long(tokens)[:, None], self._long(positions)[:, None],
                                              self.cache, absorb=True)  # [B, 1, D]
            return self._logits(hidden[:, 0])
        return self._logits(self._decode_fast(tokens, positions, slots))

    def copy_slot(self, source: int, targets: list[int], length: int) -> None:
        """Share a prefilled prompt: copy the first `length` cached latents of `source` into `targets`."""
        if not targets:
            return
        rows = self._long(targets)
        for latents in self.cache.latents:
            latents[rows, :length] = latents[source, :length]

    # -- the fast decode path ------------------------------------------------------------------------

    def refresh(self) -> None:
        """Take the model's current parameters for the fast path (views: in-place updates such as an
        optimizer step are followed anyway; this catches parameters that were replaced). The engine
        calls it before every prefill."""
        self._layers = None
        if self.decode_path == "fast" and all(type(p) in (torch.nn.Parameter, torch.Tensor) for p in self.model.parameters()):
            self._layers = [_LayerWeights(layer) for layer in self.model.layers]
            if not hasattr(self, "_cos"):
                self._rope_tables()

    def _rope_tables(self) -> None:
        # RoPE's cos/sin for every position, as the model computes them: [L, r/2] each
        positions = torch.arange(self.max_model_len, device=self.device)[:, None]
        cos, sin = self.model.rope(positions, self.dtype)
        self._cos, self._sin = cos[:, 0, 0], sin[:, 0, 0]
        # R = cos * R_cos + sin * R_sin puts each pair (x1, x2) of a head, rotated, where apply_rope puts it
        r = self.model.config.qk_rope_head_dim
        half = torch.arange(r // 2, device=self.device)
        x1, x2 = (2 * half, 2 * half + 1) if self.model.config.rope_interleave else (half, half + r // 2)
        self._rope_cos = torch.zeros(r, r, device=self.device, dtype=self.dtype)
        self._rope_sin = torch.zeros(r, r, device=self.device, dtype=self.dtype)
        self._rope_cos[x1, half] = 1
        self._rope_cos[x2, half + r // 2] = 1
        self._rope_sin[x2, half] = -1
        self._rope_sin[x1, half + r // 2] = 1

    def _decode_fast(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """The model's forward for one new token per sequence -> hidden states [B, D] (before the final norm)."""
        if getattr(self, "_layers", None) is None:
            self.refresh()
        model = self.model
        B = len(tokens)
        pos = self._long(positions)  # [B]
        slot_index = self._long(slots)
        first = slots[0]
        # the rows of the batch as a view of the cache when its slots are consecutive (always at B = 1)
        rows = slice(first, first + B) if slots == list(range(first, first + B)) else slot_index
        span = max(positions) + 1  # keys 0..span-1 are read
        # keys past a sequence's own position belong to longer neighbours (or are stale): masked
        mask = None
        if min(positions) + 1 < span:
            mask = (torch.arange(span, device=self.device)[None, :] > pos[:, None])[:, None, :]
        x = F.embedding(self._long(tokens), model.embed_tokens.weight)  # [B, D]
        rotation = self._rope_rotation(pos, x.dtype)  # [B, r, r], shared by every layer
        for layer_idx, w in enumerate(self._layers):
            h = _rms_norm(x, *w.input_norm)
            x = x + self._attention(w, h, rotation, slots, positions, slot_index, pos, rows, span, mask, layer_idx)
            h = _rms_norm(x, *w.post_norm)
            x = x + (self._moe(w, h) if w.moe is not None else _swiglu(h, *w.mlp))
        return x

    def _rope_rotation(self, pos: torch.Tensor, dtype) -> torch.Tensor:
        """daulat.model.apply_rope at positions pos [B] as one matrix per sequence [B, r, r]:
        x @ R rotates each (x1, x2) pair by the position's angle and lays the result out as
        apply_rope does ([rotated x1..., rotated x2...]), so one bmm replaces a dozen small ops."""
        cos, sin = self._cos[pos], self._sin[pos]  # [B, r/2]
        cos, sin = torch.cat([cos, cos], dim=-1)[:, None, :], torch.cat([sin, sin], dim=-1)[:, None, :]  # [B, 1, r]
        return cos * self._rope_cos + sin * self._rope_sin  # exact: every entry is +-cos, +-sin or 0

    def _attention(self, w: "_LayerWeights", h, rotation, slots, positions, slot_index, pos, rows, span, mask,
                   layer_idx) -> torch.Tensor:
        """MLA for h [B, D], one token per sequence, against the latent cache (DeepSeek-V2's absorbed form).

        The cache row of a token is [latent c | RoPE key r]; the query is [W_UK-absorbed q_nope | q_pe],
        so one bmm scores both parts, and W_UV is applied to the attention-weighted latents."""
        B = h.shape[0]
        H, n, r, c, v = w.dims
        if w.q is not None:
            q = _linear(h, w.q)
        else:
            q = _linear(_rms_norm(_linear(h, *w.q_a), *w.q_a_norm), w.q_b)
        q_nope, q_pe = q.view(B, H, n + r).split([n, r], dim=-1)  # [B, H, n], [B, H, r]
        kv_latent, k_pe = _linear(h, *w.kv_a).split([c, r], dim=-1)  # [B, c], [B, r]
        pe = torch.bmm(torch.cat([q_pe, k_pe[:, None]], dim=1), rotation)  # RoPE on H query heads + the shared key
        new = torch.cat([_rms_norm(kv_latent, *w.kv_norm), pe[:, H]], dim=-1)  # [B, c + r]
        cache = self.cache.latents[layer_idx]  # [slots, L, c + r]
        if B == 1:
            cache[slots[0], positions[0]] = new[0] if new.dtype == cache.dtype else new[0].to(cache.dtype)
        else:
            cache[slot_index, pos] = new.to(cache.dtype)
        keys = cache[rows, :span]  # [B, S, c + r]
        q_latent = torch.bmm(q_nope.transpose(0, 1), w.w_uk).transpose(0, 1)  # [B, H, c]: W_UK folded into q
        scores = torch.bmm(torch.cat([q_latent, pe[:, :H]], dim=-1), keys.transpose(1, 2))  # [B, H, S]
        if scores.dtype != torch.float32:
            scores = scores.float()
        scores = scores * w.scale  # a 0-d tensor: no Python scalar to wrap on every call
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        if probs.dtype != h.dtype:
            probs = probs.to(h.dtype)
        out_latent = torch.bmm(probs, keys[..., :c])  # [B, H, c]
        out = torch.bmm(out_latent.transpose(0, 1), w.w_uv)  # [H, B, v]: W_UV applied after attention
        return _linear(out.transpose(0, 1).reshape(B, H * v), *w.o)

    def _moe(self, w: "_LayerWeights", h: torch.Tensor) -> torch.Tensor:
        """DeepSeekMoE for h [B, D]. With fewer token-expert pairs than experts (small decode batches on
        a CPU) only the chosen experts run, one matmul pair per pair; otherwise the model's grouped path."""
        moe = w.moe
        B = h.shape[0]
        if self.device.type != "cpu" or B * moe.top_k >= moe.n_experts:
            return moe(h[:, None])[:, 0]
        _, weights, topk_idx = type(moe.gate).forward(moe.gate, h)  # the model's router: [B, K] float32, [B, K]
        weights = weights.to(h.dtype)
        rows = []
        for b, experts in enumerate(topk_idx.tolist()):
            x = h[b : b + 1] if B > 1 else h
            outs = torch.cat([_swiglu_stacked(x, w.gate_up_t[e], w.down_t[e]) for e in experts])  # [K, D]
            rows.append(torch.mm(weights[b : b + 1], outs))  # the router-weighted sum of the K experts
        routed = torch.cat(rows) if B > 1 else rows[0]
        return routed + _swiglu(h, *w.shared) if w.shared is not None else routed


def _check_cache_fits(config, slots: int, length: int, weight: torch.Tensor) -> None:
    """A one-line error, rather than an allocation failure, when the cache cannot fit in memory."""
    import os

    from daulat.errors import DaulatError

    needed = slots * length * config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * weight.element_size()
    if weight.device.type == "cuda":
        available = torch.cuda.mem_get_info(weight.device)[0]
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    else:
        return
    if needed > available:
        raise DaulatError(f"the latent KV cache for {slots} sequences of {length} tokens needs {needed / 2**30:.1f} GiB, "
                          f"more than the {available / 2**30:.1f} GiB available: lower max_num_seqs or max_model_len")


class SlotCache(LatentCache):
    """LatentCache whose per-layer latent and RoPE key share one buffer [slots, L, c + r], so that the
    fast path writes, reads and scores a token's cache row at once; `kv` and `pe` are views of it, so
    the model's own cache protocol (prefill, decode_path="model") sees an ordinary LatentCache."""

    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        c = config.kv_lora_rank
        self.latents = [torch.zeros(batch_size, max_len, c + config.qk_rope_head_dim, device=device, dtype=dtype)
                        for _ in range(config.num_hidden_layers)]
        self.kv = [t[..., :c] for t in self.latents]
        self.pe = [t[..., c:] for t in self.latents]
        self.rows = None


class _LayerWeights:
    """One block's parameters, looked up once (module attribute access is slow in Python)."""

    def __init__(self, layer):
        a = layer.self_attn
        self.input_norm = (layer.input_layernorm.weight, layer.input_layernorm.eps)
        self.post_norm = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)
        self.dims = (a.n_heads, a.nope, a.rope, a.kv_lora_rank, a.v_dim)
        self.scale = torch.tensor(a.scale, dtype=torch.float32, device=a.o_proj.weight.device)
        # weights are kept as transposed views [in, out]: x @ w_t is what F.linear runs, minus its dispatch
        self.q = a.q_proj.weight.t() if hasattr(a, "q_proj") else None
        if self.q is None:
            self.q_a = (a.q_a_proj.weight.t(), a.q_a_proj.bias)
            self.q_a_norm = (a.q_a_layernorm.weight, a.q_a_layernorm.eps)
            self.q_b = a.q_b_proj.weight.t()
        self.kv_a = (a.kv_a_proj_with_mqa.weight.t(), a.kv_a_proj_with_mqa.bias)
        self.kv_norm = (a.kv_a_layernorm.weight, a.kv_a_layernorm.eps)
        H, n, c, v = a.n_heads, a.nope, a.kv_lora_rank, a.v_dim
        kv_b = a.kv_b_proj.weight.view(H, n + v, c)  # views: they follow in-place updates of the weight
        self.w_uk = kv_b[:, :n]  # [H, n, c]
        self.w_uv = kv_b[:, n:].transpose(1, 2)  # [H, c, v]
        self.o = (a.o_proj.weight.t(), a.o_proj.bias)
        mlp = layer.mlp
        self.moe = mlp if isinstance(mlp, MoE) else None
        if self.moe is None:
            self.mlp = (mlp.gate_proj.weight.t(), mlp.up_proj.weight.t(), mlp.down_proj.weight.t())
        else:
            shared = mlp.shared_experts
            self.shared = (shared.gate_proj.weight.t(), shared.up_proj.weight.t(), shared.down_proj.weight.t()) if shared else None
            self.gate_up_t = mlp.gate_up_proj.transpose(1, 2)  # [E, D, 2I]
            self.down_t = mlp.down_proj.transpose(1, 2)  # [E, I, D]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """daulat.model.RMSNorm's arithmetic in one call: normalise in float32, scale in the input dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for x [B, in] and a transposed weight view [in, out]: the same mm/addmm kernel."""
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def _swiglu(x: torch.Tensor, gate_t: torch.Tensor, up_t: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
    return torch.mm(F.silu(torch.mm(x, gate_t)) * torch.mm(x, up_t), down_t)


def _swiglu_stacked(x: torch.Tensor, gate_up_t: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
    """A routed expert as the model stacks it, transposed: gate_up_t [D, 2I] (gate columns first), down_t [I, D]."""
    gate, up = torch.mm(x, gate_up_t).chunk(2, dim=-1)
    return torch.mm(F.silu(gate) * up, down_t)
