"""`daulat pretrain`: next-token pretraining of an MLA + MoE model on your own files.

    daulat pretrain --data docs/ notes.jsonl:licence=internal --out runs/pt --preset tiny
    daulat pretrain --out runs/pt --preset micro --steps 200          # the built-in corpus, no download
    daulat pretrain --out runs/pt --resume                            # after a crash or a kill
    torchrun --nproc-per-node 8 -m daulat.cli pretrain --data ... --out runs/pt --preset small-gpu

What happens, in order (each product lands in OUT once and is reused on --resume):

    files --Corpus--> OUT/tokenizer/ (trained on the same data unless --tokenizer is given)
          --write_shards--> OUT/data/ (tokens.bin, val.bin, index.json with the data manifest)
          --Trainer--> OUT/step-NNNNNN/ ... OUT/final/, OUT/metrics.jsonl

The model's vocab_size is the tokenizer's (the preset's value is the size the tokenizer is trained
to). Every checkpoint's daulat.json holds the stage, the merged config, the data manifest, tokens
seen, wall time, hardware and the 6 * N_active * tokens FLOPs estimate.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from daulat.errors import DaulatError
from daulat.data.pipeline import add_selection_arguments
from daulat.train.common import add_common_arguments, run_command, split_overrides
from daulat.train.objectives import next_token_objective
from daulat.train.stage import Stage, StageRun, Training, stage_schema


@dataclass
class DataConfig:
    """The [data] section: how files become token shards."""

    text_field: str = "text"  # field of .jsonl/.parquet records holding the text
    val_fraction: float = 0.01  # documents held out for validation (chosen by a hash of their text)
    builtin_docs: int = 20000  # documents of the built-in corpus, used when no --data is given
    builtin_seed: int = 0
    builtin_task: str = ""  # a task the built-in corpus leans towards (its share: builtin_task_share); "": none
    builtin_task_share: float = 0.6
    tokenizer_docs: int = 0  # documents the tokenizer is trained on, from the start of the corpus (0: all)
    min_frequency: int = 2  # a BPE merge needs at least this many occurrences
    max_file_bytes: int = 4 << 30  # bytes read from one file, after decompression (larger: skipped, counted)
    max_document_bytes: int = 16 << 20  # one document: a text file, a JSONL line, a Parquet value
    follow_links: bool = False  # follow symbolic links that leave a data folder
    # The documents pipeline (daulat.data.pipeline, documents extra): cleaning, language, PII, near-duplicates
    clean: bool = True  # false: train on the extracted text as it is
    languages: list = field(default_factory=list)  # ISO 639-1 codes to keep, e.g. ["id", "en"] (empty: all)
    include: list = field(default_factory=list)  # globs on paths inside data folders: only these are read
    exclude: list = field(default_factory=list)  # globs of paths not read
    pii: bool = True  # replace e-mail addresses, phone numbers, IBANs and card numbers by placeholders
    near_duplicates: float = 0.8  # drop a document this similar (Jaccard) to an earlier one; 0: keep

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"config field 'val_fraction' = {self.val_fraction!r}: must be in [0, 1)")
        if not 0 <= self.builtin_task_share <= 1:
            raise ValueError(f"config field 'builtin_task_share' = {self.builtin_task_share!r}: must be in [0, 1]")
        for name in ("builtin_docs", "tokenizer_docs", "min_frequency"):
            if getattr(self, name) < 0:
                raise ValueError(f"config field {name!r} = {getattr(self, name)!r}: must not be negative")


SECTIONS = ("model", "train", "data")


schema = stage_schema(model=True, data=DataConfig)


STAGE = Stage("pretrain", schema)  # the recipe's [train] as written
METHOD = "next-token prediction (plus multi-token prediction when num_nextn_predict_layers > 0)"


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="files or folders (.txt .md .jsonl .parquet, .gz of them); PATH:licence=ID records a "
                             "licence; default: the built-in corpus of task examples (no download)")
    parser.add_argument("--out", required=True, help="run directory: tokenizer, shards, checkpoints, metrics")
    parser.add_argument("--tokenizer", metavar="DIR", help="use this tokenizer instead of training one on the data")
    add_selection_arguments(parser)
    add_common_arguments(parser, default_preset="tiny")


DATA_FLAGS = {"languages": "data.languages", "include": "data.include", "exclude": "data.exclude"}


def run(args) -> int:
    data, moved = split_overrides(args.data, SECTIONS)
    return run_command(STAGE, args, DATA_FLAGS, lambda config: pretrain(config, args.out, data=data or None,
                                                                 tokenizer=args.tokenizer, resume=args.resume),
                       extra_overrides=moved)


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------


def pretrain(config: dict, out, data: list[str] | None = None, tokenizer=None, resume: bool = False,
             verbose: bool = True) -> dict:
    """Run (or resume) pretraining; returns the loop's summary plus the output path.

    config: {"model": ModelConfig, "train": TrainConfig, "data": DataConfig} (see `STAGE.config`).
    data: files/folders (None: the built-in corpus). tokenizer: a tokenizer directory (None: train one).
    """
    import torch

    from daulat.data.shards import BatchSampler, load_shards
    from daulat.architectures import build_model
    from daulat.tokenizer import load_tokenizer
    from daulat.train.loop import run_on_main

    train_cfg, data_cfg = config["train"], config["data"]
    run = StageRun(STAGE, config, out, resume=resume, verbose=verbose)
    run.check_context(train_cfg.seq_len, config["model"].max_position_embeddings, whose="model.max_position_embeddings")
    d, say = run.dist, run.say

    # Check every input before writing anything.
    corpus = None
    if data:
        from daulat.data.pipeline import training_corpus

        corpus = training_corpus(data, data_cfg)
    given = load_tokenizer(tokenizer) if tokenizer is not None else None
    out = run.prepare_output()

    start = time.time()
    run_on_main(d, lambda: _prepare_data(out, config, corpus, given, resume, say))
    tok = load_tokenizer(out / "tokenizer")
    shards = load_shards(out / "data", tok)
    if d.is_main and time.time() - start > 1:
        say(f"data ready in {time.time() - start:.1f}s")

    run.config = config = dict(config, model=dataclasses.replace(config["model"], vocab_size=tok.vocab_size))
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
    model = build_model(config["model"])
    batches = BatchSampler(shards.train, train_cfg.micro_batch_size, train_cfg.seq_len, seed=train_cfg.seed,
                           rank=d.rank, world_size=d.world_size)
    splits = shards.index["splits"]
    data_info = {"manifest": shards.index.get("manifest"), "tokenizer_sha256": tok.sha256,
                 "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"]}
    say(f"model: {model.num_parameters():,} parameters, {model.num_parameters(active=True):,} active per token, "
        f"vocab {tok.vocab_size}; data: {splits['train']['tokens']:,} train + {splits['val']['tokens']:,} val tokens; "
        f"{train_cfg.batch_size} x {train_cfg.seq_len} tokens per step on {d.world_size} x {d.device.type}")
    return run.train(Training(model, next_token_objective, batches, tok, METHOD, data_info, trains_indexer=True,
                              val_batches=_val_batches(shards, train_cfg, d, say)))


def _val_batches(shards, train_cfg, d, say):
    """The same validation sequences whatever the number of ranks and micro-batches: whole global
    batches of the split's first windows (one, padded, when the split is smaller than that)."""
    from daulat.data.shards import eval_batches

    val_windows = (len(shards.val) - 1) // train_cfg.seq_len
    if val_windows < 1:
        say(f"the validation split holds {len(shards.val)} tokens, fewer than one sequence: no validation loss")
        return None
    n_micro = max(1, min(train_cfg.eval_batches, val_windows // train_cfg.batch_size)) * train_cfg.grad_accum

    def val_batches():
        return eval_batches(shards.val, train_cfg.micro_batch_size, train_cfg.seq_len, n_micro,
                            rank=d.rank, world_size=d.world_size)

    return val_batches


def _prepare_data(out: Path, config: dict, corpus, given, resume: bool, say) -> None:
    """OUT/tokenizer/ and OUT/data/, each built once (reused when resuming), each renamed into place whole."""
    from daulat.data.shards import load_shards, write_shards
    from daulat.tokenizer import load_tokenizer, train_tokenizer

    data_cfg = config["data"]
    tok_dir, data_dir = out / "tokenizer", out / "data"

    def documents():
        if corpus is not None:
            return iter(corpus), corpus.manifest
        from daulat.data.tasks import default_corpus

        manifest = {"builtin": "daulat.data.tasks.default_corpus", "documents": data_cfg.builtin_docs,
                    "seed": data_cfg.builtin_seed, "licence": "generated by daulat (Apache-2.0)"}
        if data_cfg.builtin_task:
            manifest.update(task=data_cfg.builtin_task, task_share=data_cfg.builtin_task_share)
        return default_corpus(data_cfg.builtin_docs, seed=data_cfg.builtin_seed, task=data_cfg.builtin_task or None,
                              task_share=data_cfg.builtin_task_share), manifest

    if resume and (tok_dir / "tokenizer.json").is_file():
        tok = load_tokenizer(tok_dir)
        if given is not None and given.sha256 != tok.sha256:
            raise DaulatError(f"--tokenizer differs from the one this run was started with ({tok_dir})")
    else:
        if given is not None:
            tok = given
        else:
            docs, _ = documents()
            if data_cfg.tokenizer_docs:
                docs = islice(docs, data_cfg.tokenizer_docs)
            t = time.time()
            tok = train_tokenizer(docs, config["model"].vocab_size, min_frequency=data_cfg.min_frequency,
                                  model_max_length=config["model"].max_position_embeddings)
            say(f"trained a {tok.vocab_size}-token BPE tokenizer in {time.time() - t:.1f}s")
        _save_dir_atomically(tok_dir, tok.save)

    if resume and (data_dir / "index.json").is_file():
        index = load_shards(data_dir, tok).index
        _check_same_sources(index.get("manifest") or {}, corpus, data_cfg)
        return
    docs, manifest = documents()
    t = time.time()
    index = write_shards(docs, tok, data_dir, val_fraction=data_cfg.val_fraction, manifest=manifest)
    say(f"tokenized {index['splits']['train']['documents'] + index['splits']['val']['documents']:,} documents into "
        f"{index['splits']['train']['tokens']:,} train + {index['splits']['val']['tokens']:,} val tokens in {time.time() - t:.1f}s")


def _save_dir_atomically(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_same_sources(manifest: dict, corpus, data_cfg: DataConfig) -> None:
    """On resume the shards are reused: the data named now must be the data they were made from."""
    if corpus is None:
        same = manifest.get("builtin") is not None and manifest.get("documents") == data_cfg.builtin_docs \
            and manifest.get("seed") == data_cfg.builtin_seed and manifest.get("task", "") == data_cfg.builtin_task
        then = "the built-in corpus" if manifest.get("builtin") else "--data " + " ".join(s["path"] for s in manifest.get("sources", []))
    else:
        paths = [s["path"] for s in corpus.source_manifest()]
        same = [s.get("path") for s in manifest.get("sources", [])] == paths
        then = "the built-in corpus" if manifest.get("builtin") else "--data " + " ".join(s["path"] for s in manifest.get("sources", []))
    if not same:
        raise DaulatError(f"cannot resume: this run's token shards were made from {then}; give the same data")
