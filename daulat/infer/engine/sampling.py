"""Sampling parameters and the batched sampler.

One decode step gives logits [B, V] for B sequences that may each want different settings. The
sampler filters and normalises all rows at once; only the final draw is per sequence, from that
sequence's own `torch.Generator`, so a seeded request samples the same tokens whatever else shares
its batch. Log-probabilities are those of the model itself (log_softmax of the raw logits, before
temperature, top-k or top-p), as an OpenAI client expects (GRPO recomputes its tempered policy's
log-probs with the training model and reports this gap only at temperature 1); a `logit_bias` changes which token is drawn, not the log-probs reported (as vLLM's raw log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class InvalidParameter(ValueError):
    """A sampling parameter with a bad value; `param` names it (the server reports it as OpenAI's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class SamplingParams:
    """How to sample one prompt.

    n: samples per prompt; they share one prefill of the prompt (GRPO groups).
    temperature: 0 is greedy; otherwise logits are divided by it before top-k/top-p.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = off).
    top_k: keep the k most likely tokens (0 = off).
    max_tokens: new tokens at most (the context limit may end a sample earlier, finish_reason "length").
    stop: strings that end a sample; the text stops before them (their tokens are kept in token_ids).
    stop_token_ids: token ids that end a sample, besides the tokenizer's <|eos|>.
    ignore_eos: do not stop at <|eos|> (benchmarks, vLLM's `ignore_eos`).
    seed: a per-request seed: the same seed gives the same samples whatever else runs; sample i of a
        request with n > 1 uses a seed derived from (seed, i), and sample 0 uses `seed` itself.
    logprobs: also return the log-probs of this many most likely tokens at each step (0: only the
        sampled token's, which is always returned).
    skip_special_tokens: leave special tokens out of `text`.
    logit_bias: {token_id: bias} added to the logits before the draw (OpenAI's `logit_bias`: -100
        bans a token in practice, +100 forces it); the reported log-probs stay the model's own.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int = 0
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.n) or self.n < 1:
            raise InvalidParameter("n", f"must be a positive integer, got {self.n!r}")
        if not is_num(self.temperature) or not 0 <= self.temperature <= 100:
            raise InvalidParameter("temperature", f"must be a number between 0 and 100, got {self.temperature!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidParameter("top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        if not is_int(self.top_k) or self.top_k < 0:
            raise InvalidParameter("top_k", f"must be a non-negative integer (0 or -1: off), got {self.top_k!r}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidParameter("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidParameter("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise InvalidParameter("stop_token_ids", f"must be a list of token ids, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if self.seed is not None and not is_int(self.seed):
            raise InvalidParameter("seed", f"must be an integer, got {self.seed!r}")
        if not is_int(self.logprobs) or not 0 <= self.logprobs <= 20:
            raise InvalidParameter("logprobs", f"must be an integer between 0 and 20, got {self.logprobs!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    is_int(t) and t >= 0 and is_num(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()):
                raise InvalidParameter("logit_bias", "must map token ids to numbers between -100 and 100, "
                                                     f"got {self.logit_bias!r}")
            self.logit_bias = {t: float(b) for t, b in self.logit_bias.items()} or None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed`: sample 0 uses the seed itself, so
    n=1 and the first of n>1 samples agree; the others get well-mixed distinct seeds."""
    if index == 0:
        return seed % 2**63
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % 2**63


@dataclass
class SampledTokens:
    """What one sampling call returns for B rows."""

    token_ids: list[int]
    logprobs: list[float]  # log p(token) under the model's raw distribution
    top_logprobs: list[dict[int, float] | None]  # per row, the `params.logprobs` most likely tokens


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> SampledTokens:
    """Sample one token per row of logits [B, V] (float32), row i with params[i] and generators[i]."""
    B, V = logits.shape
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V], the model's own: reported, never biased
    logits = _biased(logits, params)
    tokens = logits.argmax(dim=-1)
    # Rows are split by how they sample, so that a row's token depends only on its own settings and
    # generator, never on which other requests share the batch.
    plain = [i for i, p in enumerate(params) if not p.greedy and not p.top_k and p.top_p >= 1]
    filtered = [i for i, p in enumerate(params) if not p.greedy and (p.top_k or p.top_p < 1)]
    for rows, filter_rows in ((plain, False), (filtered, True)):
        if rows:
            index = torch.tensor(rows, device=logits.device)
            picked = _draw(logits[index], [params[i] for i in rows], [generators[i] for i in rows], filter_rows)
            tokens[index] = picked
    token_logprobs = logprobs.gather(1, tokens[:, None])[:, 0]
    top: list[dict[int, float] | None] = [None] * B
    k_max = max(p.logprobs for p in params)
    if k_max:
        values, ids = logprobs.topk(k_max, dim=-1)
        values, ids = values.tolist(), ids.tolist()
        top = [dict(zip(ids[i][: p.logprobs], values[i][: p.logprobs])) if p.logprobs else None
               for i, p in enumerate(params)]
    return SampledTokens(tokens.tolist(), token_logprobs.tolist(), top)


def _biased(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [B, V] with each row's `logit_bias` added (a copy; the same tensor when no row has one)."""
    rows = [(i, p.logit_bias) for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return logits
    logits = logits.clone()
    V = logits.shape[1]
    for i, bias in rows:
        ids = [t for t in bias if t < V]  # ids past the logits' width are padding the model never scores
        if ids:
            logits[i, torch.tensor(ids, device=logits.device)] += torch.tensor(
                [bias[t] for t in ids], dtype=logits.dtype, device=logits.device)
    return logits


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
          filter_rows: bool) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row of logits [b, V], with temperature and optional top-k/top-p."""
    b, V = logits.shape
    dev = logits.device  # the filtering runs where the logits are; the draws come from CPU generators
    scaled = logits / torch.tensor([p.temperature for p in params], device=dev)[:, None]
    order = None
    if filter_rows:  # filter in sorted order: ranks beyond k, then the tail beyond top_p of the mass
        scaled, order = scaled.sort(dim=-1, descending=True)
        k = torch.tensor([p.top_k if p.top_k else V for p in params], device=dev)
        scaled = scaled.masked_fill(torch.arange(V, device=dev)[None, :] >= k[:, None], float("-inf"))
    probs = scaled.softmax(dim=-1)
    if filter_rows:
        top_p = torch.tensor([p.top_p if p.top_p < 1 else float("inf") for p in params], device=dev)
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p[:, None], 0.0)
    cdf = probs.cumsum(dim=-1)  # [b, V], unnormalised after filtering
    uniform = torch.stack([torch.rand((), generator=g) for g in generators]).to(dev)  # one draw per row
    pick = (cdf <= (uniform * cdf[:, -1])[:, None]).sum(dim=-1)
    last_kept = V - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(dim=-1)  # rounding can overshoot the top
    pick = torch.minimum(pick, last_kept)
    return order.gather(1, pick[:, None])[:, 0] if order is not None else pick
