"""The one skeleton of a training stage (pretrain, SFT, GRPO, distillation).

A stage module declares a `Stage` (its name, its config sections, the [train] defaults it starts
from) and fills in a `StageRun`, which owns everything the stages share:

    run = StageRun(STAGE, config, out, resume=resume)      # distributed set-up, rank-0 printing, batch checks
    ... load and check the stage's inputs (run.check_context, run.say) ...
    run.prepare_output()                                    # only once every input is known to be good
    return run.train(Training(model, objective, batches, tokenizer=..., method=..., data=..., parent=...))

`train` builds the checkpoint record through `daulat.provenance.stage_info` (stage, method, the
merged config, data, `created`, `environment`, parameters, and the history of the parent checkpoint),
runs the Trainer, and prints the closing summary. So the stage module keeps only its data, its
objective and its batch source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from daulat.errors import DaulatError


@dataclass(frozen=True)
class Stage:
    """What a stage is: its name (the record's `stage`), its config sections, its [train] defaults
    (None: the recipe's [train] as written, as pretraining reads it), and whether it may train LoRA
    adapters on the checkpoint it starts from (a [lora] section: daulat.lora.LoraConfig)."""

    name: str
    schema: Callable[[], dict[str, type]]
    train_defaults: dict | None = None
    lora: bool = False

    def config(self, preset: str | None = None, path=None, overrides=()) -> dict:
        """The stage's merged config (see daulat.config.stage_config): preset, file, overrides."""
        from daulat.config import stage_config
        from daulat.lora import LoraConfig

        schema = {**self.schema(), "lora": LoraConfig} if self.lora else self.schema()
        return stage_config(schema, self.name, preset=preset, path=path, overrides=overrides,
                            train_defaults=self.train_defaults)


def stage_schema(*, model: bool = False, **sections: type) -> Callable[[], dict[str, type]]:
    """A stage's config sections: [model] (if it builds one: any architecture's, see
    daulat.architectures), [train], then its own. They are imported when the schema is first asked
    for, so that `daulat --help` stays fast."""

    def schema() -> dict[str, type]:
        from daulat.architectures import ModelSection
        from daulat.train.loop import TrainConfig

        return {**({"model": ModelSection} if model else {}), "train": TrainConfig, **sections}

    return schema


@dataclass
class Training:
    """What a stage hands the skeleton to train: the model and its objective and batches, and what the
    checkpoint record says about them."""

    model: Any
    objective: Callable
    batches: Any  # an iterator of micro-batches with state_dict()/load_state_dict(), and maybe bind(trainer)
    tokenizer: Any
    method: str
    data: dict
    parent: dict | None = None  # daulat.json of the checkpoint this run starts from (its history is carried)
    extra: dict = field(default_factory=dict)  # more keys of the record (init, mode, teacher, ...)
    compute: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    val_batches: Callable | None = None
    trains_indexer: bool = False  # the objective is model.training_loss, which trains a V3.2 indexer too
    evaluate: Callable | None = None  # model -> dict, merged into the validation records (held-out accuracy)
    evaluate_at_start: bool = False  # also evaluate once before the first step of a fresh run
    batch_tokens: Callable | None = None  # tokens of a micro-batch (default: the Trainer's count)


class StageRun:
    """One run of a stage: distributed set-up, rank-0 printing, the shared checks, output and resume,
    the record, the Trainer, the closing summary."""

    def __init__(self, stage: Stage, config: dict, out, resume: bool = False, verbose: bool = True,
                 single_process: str | None = None):
        from daulat.train.loop import init_distributed

        self.stage, self.config, self.train_cfg = stage, config, config["train"]
        self.out, self.resume, self.resume_from = Path(out), resume, None
        self.lora = None  # the record's "lora" entry, once `adapt` put adapters on the model
        self.dist = init_distributed(self.train_cfg.device)
        self.say = print if (verbose and self.dist.is_main) else (lambda *a, **k: None)
        if single_process and self.dist.distributed:
            raise DaulatError(single_process)
        if self.train_cfg.micro_batch_size % self.dist.world_size:
            raise DaulatError(f"train.batch_size / train.grad_accum = {self.train_cfg.micro_batch_size} is not "
                              f"divisible by the {self.dist.world_size} data-parallel ranks")

    def check_context(self, needed: int, limit: int, what: str = "config train.seq_len",
                      whose: str = "the model's max_position_embeddings") -> None:
        """`needed` tokens must fit in a context of `limit` tokens."""
        if needed > limit:
            raise DaulatError(f"{what} = {needed} exceeds {whose} ({limit})")

    def load_trainable(self, path):
        """(model, tokenizer, record) of the checkpoint this run starts from, with the [lora] section
        applied (see daulat.lora.prepare: new adapters on the frozen checkpoint `path`, held as
        lora.base_dtype says, or the adapters of an adapter directory trained on); the record then
        gains its "lora" entry. New adapters are initialised from train.seed, so that two runs of one
        config start alike."""
        import torch

        from daulat import lora
        from daulat.precision import hold

        config = self.config.get("lora")
        dtype, fp8_resident = hold(config.base_dtype if config is not None and config.enabled else None)
        model, tokenizer, info = load_trainable(path, dtype=dtype, fp8_resident=fp8_resident)
        torch.manual_seed(self.train_cfg.seed)
        self.lora = lora.prepare(model, config, path)
        return model, tokenizer, info

    def prepare_output(self) -> Path:
        """Create (or check) OUT and find the checkpoint to resume from; call once the inputs are good,
        so that bad input leaves nothing behind."""
        from daulat.train.common import prepare_output
        from daulat.train.loop import latest_checkpoint, run_on_main

        self.out = Path(run_on_main(self.dist, lambda: prepare_output(self.out, self.resume)) or self.out)
        self.resume_from = latest_checkpoint(self.out) if self.resume else None
        if self.resume and self.resume_from is None:
            self.say(f"no checkpoint in {self.out} yet: starting from the beginning")
        return self.out

    def record(self, t: Training) -> dict:
        """The checkpoint's daulat.json (the Trainer fills in compute and results as it goes)."""
        from daulat.config import to_dict
        from daulat.provenance import stage_info

        return stage_info(self.stage.name, method=t.method, config=to_dict(self.config), data=t.data,
                          compute=dict(t.compute), metrics=dict(t.metrics), parent=t.parent or None,
                          **t.extra, **({"lora": self.lora} if self.lora else {}),
                          tokenizer_sha256=t.tokenizer.sha256, parameters=t.model.num_parameters(),
                          active_parameters_per_token=t.model.num_parameters(active=True))

    def train(self, t: Training) -> dict:
        """Train to train.steps; returns the Trainer's summary plus `out`."""
        from daulat.train.loop import Trainer

        batches = _EvaluateAtStart(t.batches) if (t.evaluate and t.evaluate_at_start) else t.batches
        kwargs = {"val_batches": t.val_batches, "tokenizer": t.tokenizer, "info": self.record(t),
                  "resume_from": self.resume_from, "dist": self.dist, "trains_indexer": t.trains_indexer}
        if t.batch_tokens is not None:
            kwargs["batch_tokens"] = t.batch_tokens
        trainer = Trainer(t.model, self.train_cfg, t.objective, batches, self.out, evaluate=t.evaluate, **kwargs)
        if self.resume_from is not None:
            self.say(f"resuming from {self.resume_from} (step {trainer.step})")
        summary = trainer.fit()
        loss = f"loss {summary['loss']:.4f}" if summary["loss"] is not None else "no steps run"
        val = f", val_loss {summary['val_loss']:.4f}" if summary.get("val_loss") is not None else ""
        self.say(f"{self.stage.name}: {summary['step']} steps, {summary['tokens']:,} tokens in "
                 f"{summary['wall_time_s']:.0f}s: {loss}{val} -> {self.out / 'final'}")
        summary["out"] = str(self.out)
        return summary


def load_trainable(path, dtype=None, fp8_resident: bool = False):
    """(model, tokenizer, record) of the checkpoint a stage starts from; it must have a tokenizer. An
    adapter directory is loaded onto its base unmerged, so that its adapters go on training."""
    from daulat.checkpoint import load_checkpoint

    model, tokenizer, info = load_checkpoint(path, dtype=dtype, merge_adapter=False, fp8_resident=fp8_resident)
    if tokenizer is None:
        raise DaulatError(f"checkpoint {path} has no tokenizer (tokenizer.json): a stage needs one to read its data")
    return model, tokenizer, info


class _EvaluateAtStart:
    """A batch source that, on a fresh run, evaluates once before its first batch (the point a
    held-out accuracy curve starts from) and logs it at step 0 through the Trainer."""

    def __init__(self, batches):
        self.batches, self.trainer, self.first = batches, None, True

    def bind(self, trainer) -> None:
        self.trainer = trainer
        if hasattr(self.batches, "bind"):
            self.batches.bind(trainer)

    def __iter__(self):
        return self

    def __next__(self):
        if self.first and self.trainer is not None and self.trainer.step == 0 and self.trainer.dist.is_main:
            self.trainer.log({"step": 0, **self.trainer.held_out()})
        self.first = False
        return next(self.batches)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)
