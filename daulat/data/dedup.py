"""Near-duplicate documents: MinHash signatures of word 5-grams and locality-sensitive hashing (`datasketch`,
documents extra), the method of the large web corpora (Broder 1997; used by The Pile, RefinedWeb, FineWeb).

    near = NearDuplicates(threshold=0.8)
    near.is_duplicate(text)   # True if an earlier document's estimated Jaccard similarity is >= threshold

The first of a group of near-copies is kept and the later ones dropped. Memory: one signature per kept
document (num_perm 64-bit numbers), not its text.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")


class NearDuplicates:
    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5):
        from datasketch import MinHashLSH

        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.num_perm, self.shingle = num_perm, shingle
        self.index = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.kept = 0

    def signature(self, text: str):
        from datasketch import MinHash

        words = _WORD.findall(text.lower())
        shingles = {" ".join(words[i : i + self.shingle]) for i in range(max(1, len(words) - self.shingle + 1))}
        minhash = MinHash(num_perm=self.num_perm)
        minhash.update_batch([s.encode("utf-8") for s in shingles])
        return minhash

    def is_duplicate(self, text: str) -> bool:
        """Whether `text` nearly repeats a document seen before; if not, it is remembered."""
        signature = self.signature(text)
        if self.index.query(signature):
            return True
        self.index.insert(str(self.kept), signature)
        self.kept += 1
        return False
