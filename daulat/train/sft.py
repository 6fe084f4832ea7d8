"""`daulat sft`: supervised fine-tuning on conversations; the loss is taken on the assistant's tokens only.

    daulat sft --init runs/pretrain/final --task addition --out runs/sft --steps 300
    daulat sft --init runs/pretrain/final --data chats.jsonl --out runs/sft

Data is either a JSONL file of {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
(the common chat form) or a built-in task, whose worked solutions become the assistant turns. How
conversations become rows (rendering, the loss mask, padding or packing, the held-out split, the
resumable stream) is daulat/data/conversations.py; this module is SFT's data, objective and stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daulat.data.conversations import (  # noqa: F401 - re-exported: SFT's rows are these
    IGNORE_INDEX, ConversationBatches, collate, conversation_rows, encode_conversations, held_out_batches,
    pack_examples, read_conversations,
)
from daulat.errors import DaulatError
from daulat.train.objectives import sft_objective
from daulat.train.stage import Stage, StageRun, Training, stage_schema


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

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"config field 'val_fraction' = {self.val_fraction!r}: must be in [0, 1)")


# Used when no recipe says otherwise: a short, gentle fine-tune.
TRAIN_DEFAULTS = {"steps": 300, "batch_size": 16, "seq_len": 512, "lr": 3e-4, "warmup_steps": 20, "schedule": "cosine",
                  "weight_decay": 0.0, "log_every": 10, "eval_every": 100, "eval_batches": 10}
METHOD = "supervised fine-tuning, loss on assistant tokens only"


schema = stage_schema(sft=SFTConfig)
STAGE = Stage("sft", schema, TRAIN_DEFAULTS, lora=True)


def add_arguments(parser) -> None:
    from daulat.train.common import TASK_HELP, add_common_arguments

    parser.add_argument("--init", required=True, metavar="CKPT", help="checkpoint to fine-tune (e.g. runs/pt/final)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="FILE.jsonl", help='conversations, one {"messages": [...]} per line')
    source.add_argument("--task", metavar="NAME", help=TASK_HELP)
    parser.add_argument("--out", required=True, help="run directory: checkpoints and metrics")
    add_common_arguments(parser, default_preset="tiny", lora=True)


def run(args) -> int:
    from daulat.train.common import FLAG, run_command

    flags = {"data": {"sft.data": FLAG, "sft.task": None}, "task": {"sft.task": FLAG, "sft.data": None}}
    return run_command(STAGE, args, flags, lambda config: sft(config, args.init, args.out, resume=args.resume))


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

    train_cfg, cfg = config["train"], config["sft"]
    run = StageRun(STAGE, config, out, resume=resume, verbose=verbose)

    # Check every input before writing anything.
    model, tokenizer, parent = run.load_trainable(init)
    run.check_context(train_cfg.seq_len, model.config.max_position_embeddings)
    conversations, data_info = _conversations(cfg)
    rows = conversation_rows(conversations, tokenizer, train_cfg.seq_len, cfg.pack, cfg.val_fraction)
    run.prepare_output()

    d = run.dist
    batches = ConversationBatches(rows.train, train_cfg.micro_batch_size, tokenizer.pad_id, seed=train_cfg.seed,
                                  rank=d.rank, world_size=d.world_size)
    val_batches = held_out_batches(rows.val, train_cfg.micro_batch_size, tokenizer.pad_id, train_cfg.eval_batches,
                                   rank=d.rank, world_size=d.world_size)
    c = rows.counts
    data_info.update(c)
    run.say(f"SFT data: {c['conversations'] - c['skipped']} conversations ({c['cut']} cut to {train_cfg.seq_len} "
            f"tokens, {c['skipped']} skipped with no assistant token), {c['tokens']:,} tokens of which "
            f"{c['assistant_tokens']:,} are trained on, in {c['rows']} {'packed' if cfg.pack else 'padded'} rows; "
            f"{c['val_conversations']} held out")
    return run.train(Training(model, sft_objective, batches, tokenizer, METHOD, data_info, parent=parent,
                              extra={"init": str(init)}, val_batches=val_batches, trains_indexer=True,
                              batch_tokens=lambda batch: int((batch[0] != tokenizer.pad_id).sum())))
