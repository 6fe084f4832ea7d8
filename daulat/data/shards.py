"""Token shards: a corpus tokenized once into flat memmaps, and seeded, resumable, rank-sharded batches.

    index = write_shards(corpus, tokenizer, "runs/data", manifest=corpus.manifest)
    shards = load_shards("runs/data", tokenizer)          # .train, .val: 1-D uint16/uint32 memmaps
    sampler = BatchSampler(shards.train, batch_size=32, seq_len=512, seed=0, rank=r, world_size=w)
    inputs, targets = sampler.next_batch()                 # LongTensor [32 / w, 512] each

On disk: `tokens.bin` (train) and `val.bin`, each the concatenation of `<|bos|> document <|eos|>` for
every document, as raw little-endian uint16 (vocab <= 65536) or uint32, and `index.json` (dtype, token and
document counts, document offsets, the data manifest, the tokenizer's hash). A document goes to val when a
hash of its text falls below `val_fraction`, so the split does not depend on the order or number of
documents, and duplicated documents never straddle it. A document longer than `piece_tokens` is first cut
into pieces of that many tokens, each given to train or val by a hash of the document and its index (the
first piece keeps the <|bos|>, the last the <|eos|>; the index's "documents" count these pieces), so that a
corpus of a few large files still holds out about `val_fraction` of its tokens rather than all or nothing. Everything is written under temporary names and
renamed into place, `index.json` last: a directory with an index is always complete.

Training reads random windows of seq_len + 1 tokens without caring about document boundaries (nanoGPT
style; <|bos|>/<|eos|> mark them and the model learns to reset). Each epoch is a seeded permutation of
non-overlapping windows, shifted by a seeded offset so that window boundaries move from epoch to epoch.
The sampler's whole position is one integer, so a resumed run sees exactly the batches an uninterrupted one
would have seen, and data-parallel ranks take disjoint slices of the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from daulat.errors import DaulatError

FILES = {"train": "tokens.bin", "val": "val.bin"}
INDEX = "index.json"


def is_val_document(text: str, val_fraction: float) -> bool:
    """Deterministic held-out choice for a document: a hash of its text, read as a number in [0, 1)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h / 2**64 < val_fraction


def _val_pieces(text: str, n_pieces: int, val_fraction: float) -> list[bool]:
    """is-val for each piece of a document: the whole text's hash for one piece, else (text digest, index)."""
    if n_pieces == 1:
        return [is_val_document(text, val_fraction)]
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    hashes = (hashlib.blake2b(digest + k.to_bytes(8, "big"), digest_size=8).digest() for k in range(n_pieces))
    return [int.from_bytes(h, "big") / 2**64 < val_fraction for h in hashes]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shards(documents: Iterable[str], tokenizer, out_dir: str | os.PathLike, val_fraction: float = 0.01,
                 manifest: dict | None = None, batch_docs: int = 512, piece_tokens: int = 2048) -> dict:
    """Tokenize `documents` into out_dir/{tokens.bin, val.bin, index.json}; returns the index.

    Documents are encoded `batch_docs` at a time with the tokenizer's parallel batch encoder (all cores).
    `manifest` is stored in the index as it is when writing ends (a Corpus's manifest is complete by then).
    If no document hashes into val but there are at least two, the last training document is moved there,
    so that a tiny corpus still has something to validate on.
    """
    if not 0 <= val_fraction < 1:
        raise DaulatError(f"val fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = {split: out / f".{name}.tmp-{os.getpid()}" for split, name in FILES.items()}
    offsets = {"train": [0], "val": [0]}  # offsets[split][d] = first token of document d; last = total
    try:
        with open(tmp["train"], "wb") as train_file, open(tmp["val"], "wb") as val_file:
            files = {"train": train_file, "val": val_file}
            documents = iter(documents)
            while batch := list(islice(documents, batch_docs)):
                chunks = {"train": [], "val": []}
                for text, ids in zip(batch, tokenizer.encode_batch(batch)):
                    tokens = [tokenizer.bos_id, *ids, tokenizer.eos_id]
                    n_pieces = max(1, -(-len(ids) // piece_tokens))
                    for k, val in enumerate(_val_pieces(text, n_pieces, val_fraction)):
                        piece = tokens[k * piece_tokens + bool(k) : (k + 1) * piece_tokens + 1 + (k == n_pieces - 1)]
                        split = "val" if val else "train"
                        chunks[split] += piece
                        offsets[split].append(offsets[split][-1] + len(piece))
                for split, chunk in chunks.items():
                    np.asarray(chunk, dtype=dtype).tofile(files[split])
        if val_fraction > 0 and len(offsets["val"]) == 1 and len(offsets["train"]) > 2:
            start = offsets["train"][-2]
            last = np.fromfile(tmp["train"], dtype=dtype, offset=start * dtype.itemsize)
            last.tofile(tmp["val"])
            os.truncate(tmp["train"], start * dtype.itemsize)
            offsets["val"].append(len(last))
            offsets["train"].pop()
        if len(offsets["train"]) == 1:
            raise DaulatError("no training documents to write (the corpus is empty or went entirely to val)")
        index = {
            "format": "daulat-tokens", "version": 1,
            "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "tokenizer_sha256": tokenizer.sha256,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "val_fraction": val_fraction,
            "splits": {split: {"file": FILES[split], "tokens": o[-1], "documents": len(o) - 1, "doc_offsets": o}
                       for split, o in offsets.items()},
            "manifest": manifest,
        }
        (out / INDEX).unlink(missing_ok=True)  # until the new index is in place, the directory reads as incomplete
        for split, name in FILES.items():
            os.replace(tmp[split], out / name)
        index_tmp = out / f".{INDEX}.tmp-{os.getpid()}"
        index_tmp.write_text(json.dumps(index) + "\n", encoding="utf-8")
        os.replace(index_tmp, out / INDEX)
        return index
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


@dataclass
class Shards:
    """A shard directory opened read-only: `train` and `val` are 1-D memmaps of token ids."""

    index: dict
    train: np.ndarray
    val: np.ndarray

    def documents(self, split: str = "train") -> Iterator[np.ndarray]:
        """Each document's tokens, <|bos|> ... <|eos|> included."""
        tokens, offsets = getattr(self, split), self.index["splits"][split]["doc_offsets"]
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield tokens[start:end]


def load_shards(path: str | os.PathLike, tokenizer=None) -> Shards:
    """Open a directory written by `write_shards`; with `tokenizer`, check it is the one used to write it."""
    path = Path(path)
    index_file = path / INDEX
    if not index_file.is_file():
        raise DaulatError(f"token shards not found (or incomplete): {index_file}")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        dtype = np.dtype(index["dtype"])
        splits = index["splits"]
    except (ValueError, KeyError, TypeError) as e:
        raise DaulatError(f"cannot read {index_file}: {e}") from None
    if tokenizer is not None and tokenizer.sha256 != index.get("tokenizer_sha256"):
        raise DaulatError(f"{path} was tokenized with another tokenizer (sha256 {index.get('tokenizer_sha256')}); rebuild the shards")
    arrays = {}
    for split in ("train", "val"):
        file, tokens = path / splits[split]["file"], splits[split]["tokens"]
        if not file.is_file() or file.stat().st_size != tokens * dtype.itemsize:
            raise DaulatError(f"{file} is missing or does not hold the {tokens} tokens {index_file} lists; rebuild the shards")
        arrays[split] = np.memmap(file, dtype=dtype, mode="r") if tokens else np.zeros(0, dtype)
    return Shards(index, arrays["train"], arrays["val"])


def _to_batch(tokens: np.ndarray, starts: list[int], seq_len: int):
    """(inputs, targets), LongTensor [len(starts), seq_len] each: targets are inputs shifted by one token."""
    import torch

    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)  # [B, T + 1]
    return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())


class BatchSampler:
    """Endless, seeded batches of windows over a 1-D token array, resumable and split across ranks.

    Epoch e reads the array as `n_windows` non-overlapping windows of seq_len + 1 tokens (overlapping by
    one: the last target of a window is the first input of the next), starting at a seeded shift in
    [0, seq_len), in a seeded permutation. The global stream of windows is epoch 0, then 1, ...; global batch
    k is windows [k * batch_size, (k + 1) * batch_size) of it, and rank r takes rows
    [r * batch_size / world_size, (r + 1) * batch_size / world_size) of that batch. Everything depends on
    (seed, position) only, so `state_dict()` is two integers plus a consistency check.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DaulatError(f"bad sampler settings: batch_size={batch_size}, seq_len={seq_len}, rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise DaulatError(f"global batch size {batch_size} is not divisible by the {world_size} data-parallel ranks")
        full = (len(tokens) - 1) // seq_len  # windows that fit with no shift
        if full < 1:
            raise DaulatError(f"{len(tokens)} tokens are too few for one window of seq_len {seq_len} + 1")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        # One window fewer than fit, so that any shift below seq_len keeps them all inside the array.
        self.n_windows = full - 1 if full >= 2 else 1
        self.max_shift = min(seq_len - 1, len(tokens) - 1 - self.n_windows * seq_len)
        self.position = 0  # windows consumed so far by all ranks together
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def epoch(self) -> float:
        """Passes over the data so far (fractional)."""
        return self.position / self.n_windows

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            self._epochs = {epoch: (int(rng.integers(0, self.max_shift + 1)), rng.permutation(self.n_windows))}
        return self._epochs[epoch]

    def _start(self, window: int) -> int:
        epoch, k = divmod(window, self.n_windows)
        shift, permutation = self._epoch(epoch)
        return shift + int(permutation[k]) * self.seq_len

    def next_batch(self):
        """(inputs, targets), LongTensor [batch_size / world_size, seq_len] each, for this rank."""
        rows = self.batch_size // self.world_size
        first = self.position + self.rank * rows
        starts = [self._start(first + j) for j in range(rows)]
        self.position += self.batch_size
        return _to_batch(self.tokens, starts, self.seq_len)

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position, "seq_len": self.seq_len, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. The data and seq_len must be those it was saved with; the batch size and
        the number of ranks may differ (the stream of windows is global)."""
        if state.get("seq_len") != self.seq_len or state.get("n_windows") != self.n_windows:
            raise DaulatError(f"cannot resume the data stream: saved with seq_len {state.get('seq_len')} over {state.get('n_windows')} "
                              f"windows, now seq_len {self.seq_len} over {self.n_windows} windows (did the data change?)")
        self.seed, self.position = int(state["seed"]), int(state["position"])
        self._epochs = {}


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None,
                 rank: int = 0, world_size: int = 1):
    """Consecutive non-overlapping windows from the start of `tokens`, as (inputs, targets) LongTensor
    [batch_size / world_size, seq_len] for this rank: the same batches on every call.

    All ranks get the same number of full batches: the last one wraps around to the first windows (as
    torch's DistributedSampler pads), so a validation split smaller than one batch still gives one.
    """
    if batch_size % world_size:
        raise DaulatError(f"global batch size {batch_size} is not divisible by the {world_size} data-parallel ranks")
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        return
    rows = batch_size // world_size
    n_batches = -(-n_windows // batch_size)
    for b in range(n_batches if max_batches is None else min(n_batches, max_batches)):
        first = b * batch_size + rank * rows
        yield _to_batch(tokens, [((first + j) % n_windows) * seq_len for j in range(rows)], seq_len)
