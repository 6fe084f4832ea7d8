"""The model runner: the model, its decode cache as a fixed pool of sequence slots, and two calls.

    prefill: prompts [B, T] right-padded -> the model's forward over the prompts, their cache entries
             written to the slots' rows
    decode:  the last token of each of any subset of slots [B, 1] -> the model's forward at each
             sequence's own position

Both are `model.hidden_states(ids, positions, cache)` followed by `model.logits` at the positions
whose next token is wanted: the model owns every piece of arithmetic (attention, its absorbed decode
form, the experts) and the cache layout; the runner owns only which cache rows a batch uses. The
cache is made once by `model.make_cache(max_num_seqs, max_model_len, ...)`: nothing the size of the
cache is allocated after start-up.
"""

from __future__ import annotations

import os

import torch

from daulat.errors import DaulatError


class ModelRunner:
    def __init__(self, model, max_num_seqs: int, max_model_len: int):
        self.model = model.eval()
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        _check_cache_fits(model, max_num_seqs, max_model_len, self.device, self.dtype)
        self.cache = model.make_cache(max_num_seqs, max_model_len, self.device, self.dtype)

    @property
    def cache_bytes_per_token(self) -> int:
        return self.cache.bytes_per_token()

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Write the prompts' cache entries into `slots`; return the logits after each prompt's last
        token, float32 [B, V].

        Shorter prompts are right-padded; the padding writes entries past the prompt's end, which
        decode overwrites before any query can see them (a query at position p reads keys 0..p). A
        cache that folds every token into running state (DeepSeek-V4's windows and pooled entries,
        `exact_lengths`) cannot take padding, nor what a slot's last sequence left in it: its slots are
        emptied first and its prompts prefilled in groups of equal length.
        """
        if not getattr(self.cache, "exact_lengths", False):
            return self._prefill(prompts, slots)
        self.cache.reset_rows(slots)
        groups: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(len(prompt), []).append(i)
        logits: list = [None] * len(prompts)
        for rows in groups.values():
            for i, row_logits in zip(rows, self._prefill([prompts[i] for i in rows], [slots[i] for i in rows])):
                logits[i] = row_logits
        return torch.stack(logits)

    def _prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        lengths = [len(p) for p in prompts]
        B, T = len(prompts), max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        positions = torch.arange(T, device=self.device).expand(B, T)
        self.cache.rows = slots
        hidden = self.model.hidden_states(ids.to(self.device), positions, self.cache)  # [B, T, D]
        last = hidden[torch.arange(B, device=self.device), self._long(lengths) - 1]  # [B, D]
        return self.model.logits(last).float()

    def decode(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """One token for each of B sequences: tokens/positions/slots [B] -> float32 logits [B, V]."""
        self.cache.rows = slots
        hidden = self.model.hidden_states(self._long(tokens)[:, None], self._long(positions)[:, None], self.cache)
        return self.model.logits(hidden[:, 0]).float()

    def copy_slot(self, source: int, targets: list[int], length: int) -> None:
        """Share a prefilled prompt: give `targets` the first `length` cached tokens of `source`."""
        self.cache.copy_rows(source, targets, length)


def _check_cache_fits(model, slots: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
    """A one-line error, rather than an allocation failure, when the cache cannot fit in memory."""
    # the same cache on the meta device: its size, whatever the architecture, without allocating it
    needed = slots * length * model.make_cache(slots, length, "meta", dtype).bytes_per_token()
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    else:
        return
    if needed > available:
        raise DaulatError(f"the KV cache for {slots} sequences of {length} tokens needs {needed / 2**30:.1f} GiB, "
                          f"more than the {available / 2**30:.1f} GiB available: lower max_num_seqs or max_model_len")
