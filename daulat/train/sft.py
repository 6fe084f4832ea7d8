"""Supervised fine-tuning on conversations: the loss is taken on the assistant's tokens only.

    daulat sft --init runs/pretrain/final --task addition --out runs/sft --steps 300
    daulat sft --init runs/pretrain/final --data chats.jsonl --out runs/sft

Data is either a JSONL file of {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
(the common chat form) or a built-in task, whose worked solutions become the assistant turns. Each
conversation is rendered with the checkpoint's chat template (`Tokenizer.render_chat`), which marks the
tokens the model must learn to produce: the content of every assistant turn and its closing <|eos|>.
Everything else (bos, role tokens, system and user turns, padding) has target -100 and no loss.

Rows are made in one of two ways:
  * padding (default): one conversation per row, each batch right-padded to its longest row. Exact: a
    conversation attends only to itself (attention is causal and the padding comes after it).
  * packing (`sft.pack = true`): whole conversations are packed into rows of up to train.seq_len tokens
    (first fit, longest first), no padding wasted. Each keeps its <|bos|>, and the loss mask is the
    same, but attention crosses conversation boundaries inside a row as in pretraining.
A conversation longer than train.seq_len is cut to it (its tail loses its loss); one with no assistant token
left is skipped, and the counts are printed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from daulat.errors import DaulatError

IGNORE_INDEX = -100


@dataclass
class SFTConfig:
    """The [sft] section: what to train on and how rows are made."""

    data: str | None = None  # a JSONL of {"messages": [...]} (or give --data)
    task: str | None = None  # a built-in task name or a .jsonl task (or give --task)
    task_examples: int = 20000  # conversations drawn from the task's training split
    difficulty: int | None = None  # the task's difficulty knob (default: the task's own)
    system: str | None = None  # a system prompt put before every task conversation
    pack: bool = False  # pack conversations into rows instead of padding each one
    val_fraction: float = 0.0  # conversations held out to report a validation loss (0: none)


# ------------------------------------------------------------------------------------------------
# Reading and rendering conversations
# ------------------------------------------------------------------------------------------------


def read_conversations(path) -> list[list[dict]]:
    """Conversations from a JSONL of {"messages": [...]}; a bad line is a DaulatError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DaulatError(f"SFT data not found: {path}")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DaulatError(f"{path}:{number}: not JSON ({e.msg})") from None
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages:
                raise DaulatError(f"{path}:{number}: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                        or not isinstance(m.get("content"), str):
                    raise DaulatError(f"{path}:{number}: message {i} needs 'role' (system, user or assistant) "
                                      f"and a string 'content'")
            conversations.append(messages)
    if not conversations:
        raise DaulatError(f"SFT data {path} has no conversations")
    return conversations


def encode_conversations(conversations, tokenizer, seq_len: int) -> tuple[list[tuple[list[int], list[int]]], dict]:
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


def pack_examples(examples: list[tuple[list[int], list[int]]], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Pack whole examples into rows of at most seq_len + 1 tokens, first fit in decreasing length
    (deterministic). The mask travels with its tokens."""
    capacity = seq_len + 1
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    rows: list[tuple[list[int], list[int]]] = []
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


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (ids, mask) -> inputs, targets [B, T] with T the longest row minus one.

    inputs[b, t] = ids[t]; targets[b, t] = ids[t + 1] where mask[t + 1] is 1, else -100 (prompt
    tokens, role tokens and padding never count). Padding goes on the right.
    """
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


class ConversationBatches:
    """Seeded, resumable batches of rows: each epoch is a permutation of the rows drawn from
    (seed, epoch), and the whole position is (epoch, index), so a resumed run sees the same batches.
    Under data parallelism every rank walks the same global stream and keeps its own slice of each
    global micro-batch of `batch_size` rows."""

    def __init__(self, rows, batch_size: int, pad_id: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not rows:
            raise DaulatError("no SFT rows to train on")
        self.rows, self.batch_size, self.pad_id, self.seed = rows, batch_size, pad_id, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked = []
        while len(picked) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            picked.append(self.rows[self._order[self.index]])
            self.index += 1
        share = self.batch_size // self.world_size
        return collate(picked[self.rank * share : (self.rank + 1) * share], self.pad_id)

    next_batch = __next__

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index, "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows") != len(self.rows):
            raise DaulatError(f"cannot resume the SFT data stream: it was saved over {state.get('rows')} rows, "
                              f"now there are {len(self.rows)} (did the data or sft.* settings change?)")
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


# ------------------------------------------------------------------------------------------------
# Config: a post-training stage's [train] is the preset's [train] overridden by its own [STAGE.train]
# ------------------------------------------------------------------------------------------------


# What a post-training stage takes from a recipe's [train] (written for pretraining): the machine and the
# run's mechanics, never its optimisation (a pretraining learning rate would wreck a fine-tune).
MACHINE_KEYS = ("device", "dtype", "compile", "tensorboard", "keep_last", "seed")


def stage_config(schema: dict, args, stage: str, train_defaults: dict) -> dict:
    """The merged config of a post-training stage (SFT, GRPO).

    Priority, lowest first: `train_defaults` < the preset's [train] machine keys (MACHINE_KEYS) < the
    preset's [STAGE.train] and [STAGE] < the --config file's [train], [STAGE.train] and [STAGE] <
    SECTION.KEY=VALUE overrides < --steps/--save-every/--seed.
    """
    from daulat.config import load_config, merge, read_preset, read_toml

    base = {"train": dict(train_defaults)}
    layers = []
    if args.preset:
        layers.append((read_preset(args.preset), True))
    if args.config:
        layers.append((read_toml(args.config), False))
    for raw, is_preset in layers:
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items() if k in schema}
        stage_train = raw.get(stage, {}).pop("train", {})
        if not isinstance(stage_train, dict):
            raise DaulatError(f"config: [{stage}.train] must be a table of train.* keys")
        if is_preset and "train" in raw:
            raw["train"] = {k: v for k, v in raw["train"].items() if k in MACHINE_KEYS}
        base = merge(merge(base, raw), {"train": stage_train})
    overrides = list(args.overrides or [])
    for flag, key in (("steps", "train.steps"), ("save_every", "train.save_every"), ("seed", "train.seed")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return load_config(schema, overrides=overrides, base=base)


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

# Used when no recipe says otherwise: a short, gentle fine-tune.
TRAIN_DEFAULTS = {"steps": 300, "batch_size": 16, "seq_len": 512, "lr": 3e-4, "warmup_steps": 20, "schedule": "cosine",
                  "weight_decay": 0.0, "log_every": 10, "eval_every": 100, "eval_batches": 10}


def schema() -> dict[str, type]:
    from daulat.train.loop import TrainConfig

    return {"train": TrainConfig, "sft": SFTConfig}


def sft_objective(model, batch):
    """(inputs, targets) [B, T], targets -100 off the assistant's tokens -> model.training_loss."""
    inputs, targets = batch
    return model.training_loss(inputs, targets, ignore_index=IGNORE_INDEX)


def add_arguments(parser) -> None:
    from daulat.train.common import add_common_arguments

    parser.add_argument("--init", required=True, metavar="CKPT", help="checkpoint to fine-tune (e.g. runs/pt/final)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="FILE.jsonl", help='conversations, one {"messages": [...]} per line')
    source.add_argument("--task", metavar="NAME", help="a built-in task (see `daulat tasks`), a .jsonl task file, or module:name "
                        "(a Python module that registers the task)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints and metrics")
    add_common_arguments(parser, default_preset="tiny")


def run(args) -> int:
    config = stage_config(schema(), args, "sft", TRAIN_DEFAULTS)
    if args.data:
        config["sft"].data, config["sft"].task = args.data, None
    if args.task:
        config["sft"].task, config["sft"].data = args.task, None
    if args.print_config:
        from daulat.config import to_toml

        print(to_toml(config), end="")
        return 0
    sft(config, args.init, args.out, resume=args.resume)
    return 0


def _conversations(cfg: SFTConfig) -> tuple[list, dict]:
    """The conversations to train on and a description of where they came from."""
    if cfg.data and cfg.task:
        raise DaulatError("give SFT data either as a JSONL of conversations (--data) or as a task (--task), not both")
    if cfg.data:
        import hashlib

        path = Path(cfg.data)
        conversations = read_conversations(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return conversations, {"sources": [{"path": str(path), "sha256": digest}], "conversations": len(conversations)}
    if cfg.task:
        from daulat.data.tasks import task_conversations
        from daulat.eval import load_task

        task = load_task(cfg.task)
        rows = task_conversations(task, cfg.task_examples, seed=0, difficulty=cfg.difficulty, system=cfg.system)
        return [r["messages"] for r in rows], {"builtin": f"daulat.data.tasks:{task.name}", "task": task.name,
                                               "conversations": len(rows), "difficulty": cfg.difficulty,
                                               "split": "train (the held-out eval split is never used)"}
    raise DaulatError("no SFT data: give --data FILE.jsonl or --task NAME")


def sft(config: dict, init, out, resume: bool = False, verbose: bool = True) -> dict:
    """Fine-tune the checkpoint `init` on config["sft"]'s data; returns the loop's summary."""
    from daulat.checkpoint import load_info, load_model
    from daulat.config import to_dict
    from daulat.tokenizer import load_tokenizer
    from daulat.train.common import prepare_output
    from daulat.train.loop import Trainer, init_distributed, latest_checkpoint, run_on_main

    train_cfg, cfg = config["train"], config["sft"]
    d = init_distributed(train_cfg.device)
    say = print if (verbose and d.is_main) else (lambda *a, **k: None)

    # Check every input before writing anything.
    seq_len = train_cfg.seq_len
    if not 0 <= cfg.val_fraction < 1:
        raise DaulatError(f"config sft.val_fraction = {cfg.val_fraction}: must be in [0, 1)")
    if train_cfg.micro_batch_size % d.world_size:
        raise DaulatError(f"train.batch_size / train.grad_accum = {train_cfg.micro_batch_size} is not divisible "
                          f"by the {d.world_size} data-parallel ranks")
    tokenizer = load_tokenizer(init)
    model = load_model(init)
    if seq_len > model.config.max_position_embeddings:
        raise DaulatError(f"config train.seq_len = {seq_len} exceeds the model's max_position_embeddings "
                          f"({model.config.max_position_embeddings})")
    conversations, data_info = _conversations(cfg)
    val_conversations = []
    if cfg.val_fraction > 0:
        from daulat.data.shards import is_val_document

        keyed = [(is_val_document(json.dumps(c, sort_keys=True), cfg.val_fraction), c) for c in conversations]
        conversations = [c for is_val, c in keyed if not is_val]
        val_conversations = [c for is_val, c in keyed if is_val]
    examples, counts = encode_conversations(conversations, tokenizer, seq_len)
    if not examples:
        raise DaulatError(f"no conversation has an assistant token within train.seq_len = {seq_len} tokens")
    rows = pack_examples(examples, seq_len) if cfg.pack else examples
    val_rows = encode_conversations(val_conversations, tokenizer, seq_len)[0] if val_conversations else []
    if cfg.pack and val_rows:
        val_rows = pack_examples(val_rows, seq_len)

    out = Path(run_on_main(d, lambda: prepare_output(out, resume)) or out)
    resume_from = latest_checkpoint(out) if resume else None
    if resume and resume_from is None:
        say(f"no checkpoint in {out} yet: starting from the beginning")

    share = train_cfg.micro_batch_size // d.world_size
    batches = ConversationBatches(rows, train_cfg.micro_batch_size, tokenizer.pad_id, seed=train_cfg.seed,
                                  rank=d.rank, world_size=d.world_size)
    val_batches = None
    if val_rows:
        mine = val_rows[d.rank::d.world_size] or val_rows[:1]

        def val_batches():
            n = len(mine) if not train_cfg.eval_batches else min(len(mine), train_cfg.eval_batches * share)
            return (collate(mine[i : i + share], tokenizer.pad_id) for i in range(0, n, share))

    assistant_tokens = sum(sum(mask[1:]) for _, mask in examples)
    total_tokens = sum(len(ids) for ids, _ in examples)
    data_info.update(counts, rows=len(rows), packed=cfg.pack, val_conversations=len(val_conversations),
                     tokens=total_tokens, assistant_tokens=assistant_tokens)
    parent = load_info(init)
    info = {"stage": "sft", "method": "supervised fine-tuning, loss on assistant tokens only", "init": str(init),
            "config": to_dict(config), "data": data_info, "tokenizer_sha256": tokenizer.sha256,
            "history": list(parent.get("history", [])) + ([{k: v for k, v in parent.items() if k != "history"}] if parent else [])}
    say(f"SFT data: {len(examples)} conversations ({counts['cut']} cut to {seq_len} tokens, {counts['skipped']} "
        f"skipped with no assistant token), {total_tokens:,} tokens of which {assistant_tokens:,} are trained on, "
        f"in {len(rows)} {'packed' if cfg.pack else 'padded'} rows; {len(val_conversations)} held out")
    trainer = Trainer(model, train_cfg, sft_objective, batches, out, val_batches=val_batches, tokenizer=tokenizer,
                      info=info, resume_from=resume_from, dist=d,
                      batch_tokens=lambda batch: int((batch[0] != tokenizer.pad_id).sum()))
    if resume_from is not None:
        say(f"resuming from {resume_from} (step {trainer.step})")
    summary = trainer.fit()
    val = f", val_loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""
    loss = f"loss {summary['loss']:.4f}" if summary["loss"] is not None else "no steps run"
    say(f"fine-tuned {summary['step']} steps on {summary['tokens']:,} tokens in {summary['wall_time_s']:.0f}s: "
        f"{loss}{val} -> {out / 'final'}")
    summary["out"] = str(out)
    return summary
