"""The model runner: the model plus a fixed pool of latent-cache slots, and the two forward passes.

    prefill: prompts [B, T] right-padded -> expanded attention, latents written to the slots' cache rows
    decode:  last tokens [B, 1] of any subset of slots -> absorbed attention against the cached latents

The cache is `daulat.model.LatentCache` allocated once for `max_num_seqs` slots of `max_model_len`
tokens: per token and layer it holds only kv_lora_rank + qk_rope_head_dim numbers (never per-head
keys or values), and `cache.rows` tells the model which slots the batch rows are. Nothing the size
of the cache is allocated after start-up.
"""

from __future__ import annotations

import torch

from daulat.model import DeepseekV3, LatentCache


class ModelRunner:
    def __init__(self, model: DeepseekV3, max_num_seqs: int, max_model_len: int):
        self.model = model.eval()
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.cache = LatentCache(model.config, max_num_seqs, max_model_len, device=self.device, dtype=self.dtype)

    @property
    def cache_bytes_per_token(self) -> int:
        return self.cache.bytes_per_token()

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, D] at the positions whose next token is wanted -> float32 logits [B, V]."""
        return self.model.lm_head(self.model.norm(hidden)).float()

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
        self.cache.rows = self._long(slots)
        hidden = self.model.hidden_states(self._long(tokens)[:, None], self._long(positions)[:, None],
                                          self.cache, absorb=True)  # [B, 1, D]
        return self._logits(hidden[:, 0])

    def copy_slot(self, source: int, targets: list[int], length: int) -> None:
        """Share a prefilled prompt: copy the first `length` cached latents of `source` into `targets`."""
        if not targets:
            return
        rows = self._long(targets)
        for kv, pe in zip(self.cache.kv, self.cache.pe):
            kv[rows, :length] = kv[source, :length]
            pe[rows, :length] = pe[source, :length]
