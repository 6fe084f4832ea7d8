"""Conversations as training rows: reading, encoding, packing, collating, the held-out split, and
the resumable epoch cursor that every stage's data stream walks (SFT rows, distillation rows, the
on-policy student's prompts).

    conversations = read_conversations("chats.jsonl")          # [{"role", "content"}, ...] each
    rows = conversation_rows(conversations, tokenizer, seq_len=512, pack=False, val_fraction=0.01)
    batches = ConversationBatches(rows.train, batch_size=16, pad_id=tokenizer.pad_id, seed=0)

Each conversation is rendered with the tokenizer's chat template (`Tokenizer.render_chat`), which
marks the tokens the model must learn to produce: the content of every assistant turn and its closing
<|eos|>. Everything else (bos, role tokens, system and user turns, padding) has target -100.

Rows are made in one of two ways:
  * padding (default): one conversation per row, each batch right-padded to its longest row. Exact: a
    conversation attends only to itself (attention is causal and the padding comes after it).
  * packing: whole conversations are packed into rows of up to seq_len + 1 tokens (first fit, longest
    first), no padding wasted. Each keeps its <|bos|>, and the loss mask is the same, but attention
    crosses conversation boundaries inside a row as in pretraining.
A conversation longer than seq_len + 1 tokens is cut to it (its tail loses its loss); one with no
assistant token left is skipped, and both are counted.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from daulat.errors import DaulatError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

Row = tuple[list[int], list[int]]  # (token ids, assistant mask: 1 where the token is learned)


def _json_lines(path: Path):
    """(line number, value) of each non-blank line of a JSONL file; a line that is not JSON is a
    DaulatError naming it."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DaulatError(f"{path}:{number}: not JSON ({e.msg})") from None


def read_conversations(path) -> list[list[dict]]:
    """Conversations from a JSONL of {"messages": [...]}; a bad line is a DaulatError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DaulatError(f"conversation data not found: {path}")
    conversations = []
    for number, row in _json_lines(path):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DaulatError(f"{path}:{number}: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DaulatError(f"{path}:{number}: message {i} needs 'role' (system, user or assistant) "
                                  f"and a string 'content'")
        conversations.append(messages)
    if not conversations:
        raise DaulatError(f"conversation data {path} has no conversations")
    return conversations


def encode_conversations(conversations: list[list[dict]], tokenizer, seq_len: int) -> tuple[list[Row], dict]:
    """Render each conversation -> (ids, assistant_mask), cut to seq_len + 1 tokens (a row of seq_len
    inputs predicts seq_len targets). Returns (examples, counts) where counts says how many were cut
    and how many skipped for lack of any assistant token."""
    examples, cut, skipped = [], 0, 0
    for messages in conversations:
        ids, mask = tokenizer.render_chat(messages)
        if len(ids) > seq_len + 1:
            ids, mask, cut = ids[: seq_len + 1], mask[: seq_len + 1], cut + 1
        if not any(mask[1:]):
            skipped += 1
            continue
        examples.append((ids, mask))
    return examples, {"conversations": len(conversations), "cut": cut, "skipped": skipped}


def pack_examples(examples: list[Row], seq_len: int) -> list[Row]:
    """Pack whole examples into rows of at most seq_len + 1 tokens, first fit in decreasing length
    (deterministic). The mask travels with its tokens."""
    capacity = seq_len + 1
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    rows: list[Row] = []
    free: list[int] = []  # free space of each row
    for i in order:
        ids, mask = examples[i]
        for r, space in enumerate(free):
            if len(ids) <= space:
                rows[r][0].extend(ids)
                rows[r][1].extend(mask)
                free[r] -= len(ids)
                break
        else:
            rows.append((list(ids), list(mask)))
            free.append(capacity - len(ids))
    return rows


def collate(rows: list[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (ids, mask) -> inputs, targets [B, T] with T the longest row minus one.

    inputs[b, t] = ids[t]; targets[b, t] = ids[t + 1] where mask[t + 1] is 1, else -100 (prompt
    tokens, role tokens and padding never count). Padding goes on the right.
    """
    import torch  # here, not at module load: configs and `daulat --help` stay fast

    T = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        ids_t = torch.tensor(ids, dtype=torch.long)
        mask_t = torch.tensor(mask[1:], dtype=torch.bool)
        inputs[b, :n] = ids_t[:-1]
        targets[b, :n] = torch.where(mask_t, ids_t[1:], IGNORE_INDEX)
    return inputs, targets


def split_held_out(conversations: list[list[dict]], val_fraction: float) -> tuple[list, list]:
    """(train, held out): a conversation is held out by a hash of its content (the shards' rule), so
    the split does not depend on order or on the other conversations."""
    if val_fraction <= 0:
        return list(conversations), []
    from daulat.data.shards import is_val_document

    keyed = [(is_val_document(json.dumps(c, sort_keys=True), val_fraction), c) for c in conversations]
    return [c for is_val, c in keyed if not is_val], [c for is_val, c in keyed if is_val]


@dataclass
class ConversationRows:
    """The rows of a conversation data set: train rows, held-out rows, and what was counted."""

    train: list[Row]
    val: list[Row] = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # conversations, cut, skipped, rows, val_conversations, tokens, ...


def conversation_rows(conversations: list[list[dict]], tokenizer, seq_len: int, pack: bool = False,
                      val_fraction: float = 0.0) -> ConversationRows:
    """Held-out split, encoding and (optionally) packing of conversations into training rows."""
    train, held_out = split_held_out(conversations, val_fraction)
    examples, counts = encode_conversations(train, tokenizer, seq_len)
    if not examples:
        raise DaulatError(f"no conversation has an assistant token within train.seq_len = {seq_len} tokens")
    val = encode_conversations(held_out, tokenizer, seq_len)[0] if held_out else []
    rows = pack_examples(examples, seq_len) if pack else examples
    if pack and val:
        val = pack_examples(val, seq_len)
    counts.update(rows=len(rows), packed=pack, val_conversations=len(held_out),
                  tokens=sum(len(ids) for ids, _ in examples),
                  assistant_tokens=sum(sum(mask[1:]) for _, mask in examples))
    return ConversationRows(rows, val, counts)


def held_out_batches(rows: list[Row], micro_batch_size: int, pad_id: int, max_batches: int = 0,
                     rank: int = 0, world_size: int = 1):
    """The Trainer's `val_batches`: a callable giving this rank's held-out batches, the same ones at
    every validation (at most `max_batches` of them; 0: all). None when there are no held-out rows."""
    if not rows:
        return None
    share = micro_batch_size // world_size
    mine = rows[rank::world_size] or rows[:1]

    def val_batches():
        n = len(mine) if not max_batches else min(len(mine), max_batches * share)
        return (collate(mine[i : i + share], pad_id) for i in range(0, n, share))

    return val_batches


class EpochCursor:
    """A seeded walk over `size` items, epoch after epoch: each epoch is a permutation drawn from
    (seed, epoch), and the whole position is (epoch, index), so a resumed stream continues exactly.
    `what` names the items in the error a mismatched resume gives."""

    def __init__(self, size: int, seed: int = 0, what: str = "rows"):
        if size < 1:
            raise DaulatError(f"no {what} to train on")
        self.size, self.seed, self.what = size, seed, what
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.size))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next n items as (item, draw) pairs; `draw` is a stable integer unique to the position
        (for per-item seeds that do not depend on batching)."""
        picked = []
        for _ in range(n):
            if self.index >= self.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            picked.append((self._order[self.index], hash((self.seed, self.epoch, self.index))))  # ints hash stably
            self.index += 1
        return picked

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index, self.what: self.size}

    def load_state_dict(self, state: dict) -> None:
        if state.get(self.what) != self.size:
            raise DaulatError(f"cannot resume the data stream: it was saved over {state.get(self.what)} {self.what}, "
                              f"now there are {self.size} (did the data or the stage's settings change?)")
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


class ConversationBatches:
    """Seeded, resumable batches of rows walked by an `EpochCursor`. Under data parallelism every rank
    walks the same global stream and keeps its own slice of each global micro-batch of `batch_size` rows."""

    def __init__(self, rows: list[Row], batch_size: int, pad_id: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.cursor = EpochCursor(len(rows), seed, what="rows")
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked = [self.rows[i] for i, _ in self.cursor.take(self.batch_size)]
        share = self.batch_size // self.world_size
        return collate(picked[self.rank * share : (self.rank + 1) * share], self.pad_id)

    next_batch = __next__

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state)
