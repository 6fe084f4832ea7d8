"""Reading untrusted files: regular files only, streamed in blocks, decompression included, within caps.

Shared by the corpus reader (daulat.data.corpus) and the document extractors (daulat.data.documents).
"""

from __future__ import annotations

import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from daulat.errors import DaulatError

BLOCK = 1 << 20  # bytes read at a time


@dataclass(frozen=True)
class ReadLimits:
    """Caps on what one file may cost. Defaults fit real corpora (a long book is a few MB; web JSONL
    shards are a few GB) and stop decompression bombs and single-line files long before memory runs out.

    max_file_bytes: bytes read from one file, counted after decompression (a larger file: file_too_large).
    max_document_bytes: bytes of one document: a whole text file, one JSONL line, one Parquet value
        (larger: document_too_large). It also bounds what the tokenizer trainer sees in one piece.
    follow_links: follow symbolic links whose target lies outside the source's root folder.
    """

    max_file_bytes: int = 4 << 30
    max_document_bytes: int = 16 << 20
    follow_links: bool = False

    def __post_init__(self):
        for name in ("max_file_bytes", "max_document_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DaulatError(f"data {name} must be a positive number of bytes, got {value!r}")


class Skipped(Exception):
    """A file (or folder) is skipped; args[0] is the reason counted in the manifest."""


def open_regular(path: Path):
    """A binary file object for `path`, which must be a regular file; raises Skipped otherwise.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer, and the type is checked
    on the opened descriptor, so a file swapped for a FIFO or a device after listing is caught too.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError:
        raise Skipped("unreadable") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Skipped("not_regular_file")
    return os.fdopen(fd, "rb")


def chunks(stream) -> Iterator[bytes]:
    while block := stream.read(BLOCK):
        yield block


def inflated(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """The decompressed content of gzip data given as blocks, at most BLOCK bytes at a time, members
    concatenated as gzip does; raises Skipped("corrupt") on bad or truncated data."""
    inflate, in_member = zlib.decompressobj(wbits=31), False
    try:
        for pending in blocks:
            while pending:
                in_member = True
                data = inflate.decompress(pending, BLOCK)
                if data:
                    yield data
                if inflate.eof:  # another member may follow
                    pending = inflate.unused_data
                    inflate, in_member = zlib.decompressobj(wbits=31), False
                else:
                    pending = inflate.unconsumed_tail
    except zlib.error:
        raise Skipped("corrupt") from None
    if in_member:
        raise Skipped("corrupt")  # truncated


def ordered_map(fn, items, workers: int, window: int | None = None) -> Iterator:
    """fn(item) for each item, in the order of `items`, computed by `workers` processes (0: in this one).

    At most `window` items (default 2 per worker) are in flight at a time, so that a slow consumer or a
    million items never pile their results up in memory; the order of the results, and so everything
    computed from them, is the same whatever the number of workers. `fn` and the items must pickle.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    # forkserver: workers start from a clean process, not a fork of one that may hold threads (torch, tqdm)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    window = window or 2 * workers
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def worker_count(workers: int | None, files: int) -> int:
    """None: one process per core (at most 8) for a corpus big enough to pay for starting them, else none."""
    if workers is not None:
        return max(0, workers)
    return min(8, os.cpu_count() or 1) if files >= 64 else 0


def progress(total: int, show: bool | None, unit: str = "file"):
    """A tqdm bar on stderr: shown when asked (show=True) or, by default, when stderr is a terminal."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, disable=not (sys.stderr.isatty() if show is None else show),
                dynamic_ncols=True, leave=False)
