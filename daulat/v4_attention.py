"""DeepSeek-V4's attention: shared-KV multi-query attention over a sliding window plus compressed entries.

Every layer attends to the last `sliding_window` tokens. A compressed layer also attends to entries that
each summarise a window of `m` source tokens (softmax-gated pooling with a learned position bias):

  * compressed sparse attention (CSA, rate m, overlapping windows of width 2m): a lightning indexer
    scores the compressed entries per query and only the top `index_topk` of them are gathered;
  * heavily compressed attention (HCA, rate m', non-overlapping windows): every finished entry is seen.

Keys and values are one tensor (K = V, one head shared by all query heads), so the RoPE a key carries
also lands in the output: the output's rope slice is rotated back by the query's own position. Each
head has a learned sink logit (a softmax slot with no value), and heads are projected out in groups.

Semantics (names, order of operations, which entries a query sees) follow transformers'
`deepseek_v4` so that checkpoints load both ways; unlike transformers the sparse branch is computed
over the gathered selected entries and the window over a banded view, never over a masked [T, T] matrix.

Shapes: B batch, T tokens, H query heads, d head_dim, r rope dims, W sliding window, N compressed
entries, k selected entries, m compression rate, g output groups, h_I / c_I indexer heads / head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from daulat.model import RMSNorm, applied_weight, apply_rope


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last r = 2 * cos.shape[-1] channels of x [..., d]; cos/sin broadcast to [..., r/2].

    V4 pairs channels (0,1), (2,3), ... and, unlike V3, keeps each pair in place: the rotated key is
    also the value, so its layout reaches the output projection and must be the checkpoint's.
    """
    r = 2 * cos.shape[-1]
    rotated = apply_rope(x[..., -r:], cos, sin, interleave=True)  # [evens', odds']
    rotated = rotated.unflatten(-1, (2, r // 2)).transpose(-1, -2).flatten(-2)  # pairs back in place
    return torch.cat([x[..., :-r], rotated], dim=-1)


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight, statistics in float32: x [..., n] -> [..., n]."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables of one RoPE base (V4 has two: `main` for sliding layers, `compress` with YaRN)."""

    def __init__(self, inv_freq: torch.Tensor, attention_factor: float):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = attention_factor

    def forward(self, positions: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> cos, sin [..., r/2]."""
        angles = positions[..., None].float() * self.inv_freq.float()
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)


class Compressor(nn.Module):
    """Pools every m tokens into one entry: C_w = RMSNorm(sum_j softmax_j(Z_j + B) * C_j), rotated at w*m.

    overlap=True (CSA) projects 2*dim channels per token: the second half pools into its own window's
    entry, the first half into the next window's, so entry w covers tokens (w-1)m .. (w+1)m - 1.
    """

    def __init__(self, hidden_size: int, dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.dim, self.rate, self.overlap = dim, rate, overlap
        width = 2 * dim if overlap else dim
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(dim, eps)

    def compress(self, x: torch.Tensor, rope: Rotary, state: "CompressorState | None" = None) -> torch.Tensor:
        """x [B, T, D] -> entries [B, N, dim]: N = T // m without a state; with one, the rows of the
        unfinished window wait in it and all entries so far are returned."""
        kv, gate = self.kv_proj(x), self.gate_proj(x)  # [B, T, width]
        first = 0
        if state is not None:
            if state.tail_kv is not None:
                kv, gate = torch.cat([state.tail_kv, kv], dim=1), torch.cat([state.tail_gate, gate], dim=1)
            first = 0 if state.entries is None else state.entries.shape[1]
        B, L, _ = kv.shape
        m, n = self.rate, L // self.rate
        if state is not None:
            # copies, not views: a view would keep this whole call's projections alive in the cache
            state.tail_kv, state.tail_gate = kv[:, n * m :].clone(), gate[:, n * m :].clone()
        kv = kv[:, : n * m].view(B, n, m, kv.shape[-1])  # [B, N_new, m, width]
        gate = gate[:, : n * m].view(B, n, m, gate.shape[-1]) + self.position_bias
        previous = None if state is None else state.last_window
        entries = self._pool(kv, gate, previous, first, rope)
        if state is None:
            return entries
        if n and self.overlap:  # only the overlapping windows read the window before
            state.last_window = (kv[:, -1].clone(), gate[:, -1].clone())
        state.entries = entries if state.entries is None else torch.cat([state.entries, entries], dim=1)
        return state.entries

    def _pool(self, kv, gate, previous, first: int, rope: Rotary) -> torch.Tensor:
        """kv, gate [B, N, m, width] (gate with its position bias) -> entries [B, N, dim], entry w
        rotated at its window's first token (first + w) * m. previous: the (kv, gate) [B, m, width] of
        the window before these, or None at the sequence's start."""
        if self.overlap:
            # [B, N, 2m, dim]: slots 0..m-1 are the previous window's first halves (none before the
            # first window: weight zero through a -inf gate), slots m..2m-1 this window's second halves
            if previous is None:
                previous = (kv.new_zeros(kv[:, :1].shape), gate.new_full(gate[:, :1].shape, float("-inf")))
            else:
                previous = (previous[0][:, None], previous[1][:, None])
            n = kv.shape[1]
            previous_kv = torch.cat([previous[0], kv], dim=1)[:, :n, :, : self.dim]
            previous_gate = torch.cat([previous[1], gate], dim=1)[:, :n, :, : self.dim]
            kv = torch.cat([previous_kv, kv[..., self.dim :]], dim=2)
            gate = torch.cat([previous_gate, gate[..., self.dim :]], dim=2)
        # the gate's softmax runs over the window's slots, per channel, in float32
        pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)  # [B, N, dim]
        positions = (first + torch.arange(kv.shape[1], device=kv.device)) * self.rate
        cos, sin = rope(positions, pooled.dtype)
        return rope_tail(self.kv_norm(pooled), cos, sin)


@dataclass
class CompressorState:
    """What a compressor carries between calls: the rows of its unfinished window (the partial tail),
    the last finished window (CSA's overlap reads it) and every entry made so far."""

    tail_kv: torch.Tensor | None = None  # [B, < m, width]
    tail_gate: torch.Tensor | None = None
    last_window: tuple[torch.Tensor, torch.Tensor] | None = None  # (kv, gate) [B, m, width]
    entries: torch.Tensor | None = None  # [B, N, dim]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.tail_kv, self.tail_gate, *(self.last_window or ()), self.entries) if t is not None]


@dataclass
class LayerCache:
    """One layer's decode state: the last W - 1 keys (the window), the compressor's and the indexer's."""

    window: torch.Tensor | None = None  # [B, <= W - 1, d]
    compressor: CompressorState = field(default_factory=CompressorState)
    indexer: CompressorState = field(default_factory=CompressorState)

    def tensors(self) -> list[torch.Tensor]:
        window = [] if self.window is None else [self.window]
        return window + self.compressor.tensors() + self.indexer.tensors()


def stack_states(states: list):
    """The decode states of several rows at one length (LayerCaches, or their parts: each row's tensors
    [1 or more, ...] of equal shapes past the batch dimension) as one state over all their rows, so
    that the rows decode together in one batch (DeepseekV4.hidden_states)."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(states)
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(stack_states(list(parts)) for parts in zip(*states))
    return type(first)(**{f.name: stack_states([getattr(s, f.name) for s in states]) for f in fields(first)})


def split_states(state, sizes: list[int]) -> list:
    """stack_states undone: one state per group of `sizes` rows (views of the stacked tensors)."""
    if isinstance(state, torch.Tensor):
        return list(state.split(sizes))
    if state is None:
        return [None] * len(sizes)
    if isinstance(state, tuple):
        return [tuple(parts) for parts in zip(*(split_states(part, sizes) for part in state))]
    parts = {f.name: split_states(getattr(state, f.name), sizes) for f in fields(state)}
    return [type(state)(**{name: values[i] for name, values in parts.items()}) for i in range(len(sizes))]


class Indexer(Compressor):
    """Lightning indexer over CSA's compressed entries (its own compressor at c_I channels):
    score[t, s] = sum_h w[t, h] * ReLU(q[t, h] . K[s]) ; each query keeps its top `index_topk` entries."""

    def __init__(self, config):
        super().__init__(config.hidden_size, config.index_head_dim,
                         config.compress_rates["compressed_sparse_attention"], True, config.rms_norm_eps)
        self.n_heads, self.topk = config.index_n_heads, config.index_topk
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * self.dim, bias=False)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def scores(self, x: torch.Tensor, q_residual: torch.Tensor, rope: Rotary, positions: torch.Tensor,
               state: CompressorState | None = None) -> torch.Tensor:
        """x [B, T, D], q_residual [B, T, q_lora_rank] at positions [T] -> index scores [B, T, N]
        (float32; -inf where the entry's window is not finished at the query's position)."""
        B, T, _ = x.shape
        keys = self.compress(x, rope, state)  # [B, N, c_I]
        cos, sin = rope(positions, x.dtype)
        q = rope_tail(self.q_b_proj(q_residual).view(B, T, self.n_heads, self.dim), cos[:, None], sin[:, None])
        weights = self.weights_proj(x).float() * self.n_heads**-0.5  # [B, T, h_I]
        # the per-head scores [B, t, h_I, N] are made a block of queries at a time, so that at long
        # context they never exist whole (at 4K tokens and 16 heads they would be 16 times the result)
        rows = max(1, 2**22 // max(1, B * self.n_heads * keys.shape[1]))
        scores = torch.cat([
            torch.einsum("bthn,bth->btn", F.relu(torch.einsum("bthc,bnc->bthn", q_block.float(), keys.float())),
                         w_block) * self.dim**-0.5
            for q_block, w_block in zip(q.split(rows, dim=1), weights.split(rows, dim=1))
        ], dim=1)
        return scores.masked_fill(~entry_visible(positions, keys.shape[1], self.rate), float("-inf"))

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [B, T, N] -> indices [B, T, k] of the best entries, -1 where fewer than k are visible."""
        top = scores.topk(min(self.topk, scores.shape[-1]), dim=-1)
        return top.indices.masked_fill(top.values == float("-inf"), -1)


def entry_visible(positions: torch.Tensor, N: int, rate: int) -> torch.Tensor:
    """positions [T] -> [T, N] bool: the query at t sees entry w once its window has ended,
    (w + 1) * m <= t + 1."""
    return torch.arange(N, device=positions.device)[None, :] < ((positions + 1) // rate)[:, None]


class V4Attention(nn.Module):
    """One layer's attention: x [B, T, D] -> [B, T, D]."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        H, d = config.num_attention_heads, config.head_dim
        self.n_heads, self.head_dim, self.window = H, d, config.sliding_window
        self.o_groups, self.eps = config.o_groups, config.rms_norm_eps
        self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, H * d, bias=False)
        self.kv_proj = nn.Linear(config.hidden_size, d, bias=False)
        self.kv_norm = RMSNorm(d, config.rms_norm_eps)
        # grouped low-rank output: each group of H*d/g channels -> o_lora_rank, then all groups -> D
        self.o_a_proj = nn.Linear(H * d // config.o_groups, config.o_groups * config.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(config.o_groups * config.o_lora_rank, config.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(H))
        self.compressor: Compressor | None = None
        if self.layer_type == "compressed_sparse_attention":
            rate = config.compress_rates[self.layer_type]
            self.compressor = Compressor(config.hidden_size, d, rate, True, config.rms_norm_eps)
            self.compressor.indexer = Indexer(config)
        elif self.layer_type == "heavily_compressed_attention":
            rate = config.compress_rates[self.layer_type]
            self.compressor = Compressor(config.hidden_size, d, rate, False, config.rms_norm_eps)
        self.indexer_loss: torch.Tensor | None = None  # KL of the indexer to this layer's attention
        self.train_indexer = False  # set by the model when its indexer loss is switched on

    def forward(self, x: torch.Tensor, rope: Rotary, start: int = 0, cache: LayerCache | None = None) -> torch.Tensor:
        """x [B, T, D] at positions start..start+T-1; rope is this layer's table (main or compress).
        With a cache (filled from position 0 by earlier calls) the new tokens also see what it holds."""
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        positions = start + torch.arange(T, device=x.device)
        cos, sin = rope(positions, x.dtype)  # [T, r/2]
        q_residual = self.q_a_norm(self.q_a_proj(x))  # [B, T, q_lora_rank]
        q = unit_rms(self.q_b_proj(q_residual).view(B, T, H, d), self.eps)
        q = rope_tail(q, cos[:, None], sin[:, None])  # [B, T, H, d]
        kv = rope_tail(self.kv_norm(self.kv_proj(x)), cos, sin)  # [B, T, d]: key and value alike

        # the window as a banded view: slot j of the query at t holds the key at t - W + 1 + j
        W = self.window
        keys = kv if cache is None or cache.window is None else torch.cat([cache.window, kv], dim=1)
        if cache is not None:
            cache.window = keys[:, keys.shape[1] - min(W - 1, keys.shape[1]) :].clone()  # the ring's W - 1 keys
        windows = F.pad(keys, (0, 0, W - 1 - (keys.shape[1] - T), 0)).unfold(1, W, 1)  # [B, T, d, W]
        slot_pos = positions[:, None] - W + 1 + torch.arange(W, device=x.device)
        logits = [torch.einsum("bthd,btdw->bhtw", q, windows).masked_fill(slot_pos < 0, float("-inf"))]
        values = [windows]
        selected = None
        if self.compressor is not None:
            entries = self.compressor.compress(x, rope, None if cache is None else cache.compressor)  # [B, N, d]
            if self.layer_type == "compressed_sparse_attention":
                selected, entry_logits, entry_values = self._selected(x, q_residual, q, entries, rope, positions, cache)
            else:  # HCA sees every finished entry
                visible = entry_visible(positions, entries.shape[1], self.compressor.rate)
                entry_logits = torch.einsum("bthd,bnd->bhtn", q, entries).masked_fill(~visible, float("-inf"))
                entry_values = entries
            logits.append(entry_logits)
            values.append(entry_values)
        out, probs = self._softmax_with_sinks(logits, values)  # [B, T, H, d]
        if selected is not None and self.training and self.train_indexer and cache is None:
            self.indexer_loss = self._indexer_kl(x, q_residual, rope, selected, probs[-1])
        out = rope_tail(out, cos[:, None], -sin[:, None])  # undo the keys' rotation at the query's position
        grouped = out.reshape(B, T, self.o_groups, -1)  # [B, T, g, H*d/g]
        # [g, o_lora_rank, H*d/g]: the matrix o_a_proj applies (with a live LoRA adapter, W + B A)
        weight = applied_weight(self.o_a_proj).view(self.o_groups, -1, grouped.shape[-1])
        return self.o_b_proj(torch.einsum("btgi,gri->btgr", grouped, weight).flatten(2))

    def _selected(self, x, q_residual, q, entries, rope, positions, cache):
        """CSA: the indexer's top-k entries per query, gathered. Returns (indices [B, T, k] with -1 for
        none, logits [B, H, T, k], values [B, T, k, d])."""
        indexer = self.compressor.indexer
        with torch.no_grad():  # top-k is discrete: the indexer learns only through its own KL loss
            state = None if cache is None else cache.indexer
            selected = indexer.select(indexer.scores(x, q_residual, rope, positions, state))
        B, T, k = selected.shape
        batch = torch.arange(B, device=x.device)[:, None, None]
        gathered = entries[batch, selected.clamp(min=0)]  # [B, T, k, d]
        entry_logits = torch.einsum("bthd,btkd->bhtk", q, gathered)
        return selected, entry_logits.masked_fill((selected < 0)[:, None], float("-inf")), gathered

    def _softmax_with_sinks(self, logits, values):
        """Softmax over every key slot plus one sink slot per head; the sink takes weight but adds no value.
        logits: list of [B, H, T, S_i]; values: [B, T, d, W] for the window, then [B, N, d] or [B, T, k, d].
        Returns (output [B, T, H, d], per-part probabilities)."""
        scale = self.head_dim**-0.5
        B, H, T, _ = logits[0].shape
        sink = self.sinks.to(logits[0].dtype).view(1, H, 1, 1).expand(B, H, T, 1)
        combined = torch.cat([part * scale for part in logits] + [sink], dim=-1)
        probs = (combined - combined.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        parts = probs[..., :-1].split([part.shape[-1] for part in logits], dim=-1)
        out = torch.einsum("bhtw,btdw->bthd", parts[0], values[0])
        for p, v in zip(parts[1:], values[1:]):
            out = out + (torch.einsum("bhtn,bnd->bthd", p, v) if v.dim() == 3 else
                         torch.einsum("bhtk,btkd->bthd", p, v))
        return out, parts

    def _indexer_kl(self, x, q_residual, rope, selected, entry_probs):
        """KL(attention || indexer) over each query's selected entries (DeepSeek-V3.2's sparse stage):
        the target is the heads' summed attention, renormalised; the indexer's input is detached, so
        this loss trains the indexer only. entry_probs [B, H, T, k] -> scalar."""
        indexer = self.compressor.indexer
        positions = torch.arange(x.shape[1], device=x.device)
        scores = indexer.scores(x.detach(), q_residual.detach(), rope, positions)  # [B, T, N]
        valid = selected >= 0
        chosen = scores.gather(-1, selected.clamp(min=0)).masked_fill(~valid, float("-inf"))
        log_q = chosen.log_softmax(dim=-1).masked_fill(~valid, 0.0)
        target = entry_probs.detach().float().sum(1)  # [B, T, k]
        target = target / target.sum(-1, keepdim=True).clamp(min=1e-20)
        rows = valid.any(-1)  # queries that see at least one entry
        kl = (target * (target.clamp(min=1e-20).log() - log_q)).sum(-1)
        return kl[rows].mean() if rows.any() else scores.new_zeros(())
