"""`daulat distill`: a teacher into a smaller student, three ways, on the one training loop.

    daulat distill --teacher runs/big/final --preset micro --task addition --mode fkl --out runs/small
    daulat distill --teacher http://127.0.0.1:8000/v1 --student runs/small/final --task addition --mode sft --out runs/s2
    daulat distill --teacher runs/big/final --student runs/small/final --data chats.jsonl --mode rkl --out runs/s3

The modes:

  sft  sequence-level (Kim & Rush 2016; how DeepSeek made the R1 distilled models): the teacher answers
       the prompts (the engine, batched, or any OpenAI-compatible endpoint: daulat serve, vLLM,
       llama.cpp), answers the task's checker rejects and answers cut off at max_tokens are dropped,
       the rest is written to OUT/teacher_data.jsonl (`{"messages": [...]}` rows, which `daulat sft
       --data` also reads) with OUT/teacher_data.json saying who the teacher was, how it sampled and
       what was kept; the student is then fine-tuned on it with the SFT stage's batches and loss.
       Works across tokenizers: the student re-reads the text with its own.
  fkl  logit-level forward KL (Hinton et al. 2015): on teacher-generated (as for sft) or given
       sequences, the student matches the teacher's whole next-token distribution on the answer tokens,
       T^2 * KL(p_teacher^T || p_student^T) at temperature T, optionally mixed with the next-token loss:
       (1 - ce_weight) * T^2 * KL + ce_weight * CE.
  rkl  on-policy reverse KL (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024): every step the student
       answers fresh prompts with the engine and is pulled toward the teacher on its own tokens,
       KL(p_student || p_teacher) = E_student[log p_s - log p_t] per generated position. By default the
       expectation is taken exactly over the whole vocabulary ("full"): the teacher's full distribution
       comes with its one forward anyway, and the exact per-position KL has the same expected gradient as
       the policy-gradient form (reward -(log p_s - log p_t) of the sampled token, times grad log p_s) but
       none of the variance of the single token draw. The policy-gradient form is there too
       (`distill.rkl_estimator = "sampled"`); it needs only the teacher's log-prob of each sampled token.

fkl and rkl need the teacher's full distribution, so a local checkpoint with the student's tokenizer
(checked; a mismatch is a one-line error). Teacher and student may otherwise differ in every
architecture field. The teacher never trains: eval mode, no gradients, bfloat16 on a GPU, one forward
per student micro-batch. With --preset and no --student, the student is a fresh model of that preset
with the teacher's tokenizer (or --tokenizer's). The student's daulat.json records its teacher, the
mode, and the history of its parent (the --student checkpoint, or the teacher for a fresh student).

The pieces: the losses in distill_losses.py, the prompts and the teacher's answers in teacher_data.py,
the student's own answers in on_policy.py; here, the config, the table of modes (MODES: what each
mode needs, its objective and its batches) and the stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable

from daulat.errors import DaulatError
from daulat.generation import SampleRequest, Sampling
from daulat.train.distill_losses import (  # noqa: F401 - the losses, re-exported
    ForwardKLObjective, ReverseKLObjective, forward_kl, reverse_kl, reverse_kl_policy_gradient,
)
from daulat.train.on_policy import OnPolicyBatches  # noqa: F401
from daulat.train.stage import Stage, StageRun, Training, stage_schema
from daulat.train.teacher_data import DATASET_FILE, MANIFEST_FILE, Prompt, load_prompts, teacher_dataset  # noqa: F401

SEQUENCES = ("teacher", "given")
RKL_ESTIMATORS = ("full", "sampled")
STUDENT_INITS = ("random", "pruned")


@dataclass(frozen=True)
class Mode:
    """What a distillation mode is: its method (for the record), whether it needs the teacher's full
    next-token distribution, whether the student trains on its own samples (on-policy) or on rows of
    sequences (the teacher's answers, or given ones where `given_ok`), and its objective."""

    method: str
    needs_logits: bool
    on_policy: bool
    given_ok: bool
    objective: Callable  # (teacher, vocab_size, DistillConfig) -> objective(model, batch)

    def sequences(self, cfg) -> str:
        """What the student trains on: "student" (its samples), "teacher" (its answers) or "given"."""
        if self.on_policy:
            return "student"
        return cfg.sequences if self.given_ok else "teacher"


def _sft_objective(teacher, vocab_size, cfg):
    from daulat.train.objectives import sft_objective

    return sft_objective


MODES = {
    "sft": Mode("sequence-level distillation: supervised fine-tuning on teacher answers (filtered by the task "
                "checker where there is one)", needs_logits=False, on_policy=False, given_ok=False,
                objective=_sft_objective),
    "fkl": Mode("logit-level distillation: forward KL to the teacher's temperature-scaled next-token distribution",
                needs_logits=True, on_policy=False, given_ok=True,
                objective=lambda teacher, V, cfg: ForwardKLObjective(teacher, V, cfg.kl_temperature, cfg.ce_weight)),
    "rkl": Mode("on-policy distillation: reverse KL to the teacher on the student's own samples",
                needs_logits=True, on_policy=True, given_ok=False,
                objective=lambda teacher, V, cfg: ReverseKLObjective(teacher, V, cfg.rkl_estimator)),
}


@dataclass
class DistillConfig:
    """The [distill] section (a recipe may also hold a [distill.train] table of train.* keys)."""

    mode: str = "sft"  # a key of MODES: "sft", "fkl" or "rkl" (or give --mode)
    task: str | None = None  # a built-in task or a .jsonl task: its prompts, and its checker (or --task)
    data: str | None = None  # a JSONL of {"messages": [...]}: its prompts, or its sequences (or --data)
    difficulty: int | None = None  # the task's difficulty knob (default: the task's own)
    system: str | None = None  # a system prompt put before every task prompt
    prompts: int = 2000  # prompts drawn from the task's training split (every row of --data is used)
    sequences: str = "teacher"  # fkl: train on the teacher's answers ("teacher") or on the data as given ("given")
    # how the teacher answers (sft, and fkl on teacher sequences): [distill.teacher_sampling]
    teacher_sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.6, top_p=0.95, max_tokens=256))
    samples_per_prompt: int = 1
    keep_per_prompt: int = 1  # distinct accepted answers kept per prompt
    filter: bool = True  # drop answers the task's checker rejects
    drop_truncated: bool = True  # drop answers cut off at teacher_sampling.max_tokens
    # the losses
    kl_temperature: float = 1.0  # fkl: T of the softened distributions (the loss is scaled by T^2)
    ce_weight: float = 0.0  # fkl: weight of the plain next-token loss on the same tokens
    rkl_estimator: str = "full"  # rkl: "full" (exact KL over the vocabulary) or "sampled" (policy gradient)
    # a fresh student (--preset, no --student): "random" weights, or "pruned" from the teacher (daulat.prune:
    # the teacher cut down to the preset's shape, keeping what it uses most on the first calibration_prompts)
    student_init: str = "random"
    calibration_prompts: int = 64
    # how the student answers (rkl): [distill.student_sampling]
    student_sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=128))
    # rows (sft, fkl): at most train.seq_len tokens each, as in SFT
    pack: bool = False  # pack conversations into rows instead of padding each one
    val_fraction: float = 0.0  # conversations held out to report a validation loss
    # an OpenAI-compatible teacher
    teacher_model: str | None = None  # the model name to ask for (default: the first the server lists)
    http_concurrency: int = 8  # requests in flight
    http_timeout: float = 300.0  # seconds per request

    def __post_init__(self):
        def need(ok, name, why):
            if not ok:
                raise ValueError(f"config field {name!r} = {getattr(self, name)!r}: {why}")

        need(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}")
        need(self.sequences in SEQUENCES, "sequences", f"must be one of {', '.join(SEQUENCES)}")
        need(self.student_init in STUDENT_INITS, "student_init", f"must be one of {', '.join(STUDENT_INITS)}")
        need(self.rkl_estimator in RKL_ESTIMATORS, "rkl_estimator", f"must be one of {', '.join(RKL_ESTIMATORS)}")
        for name in ("prompts", "samples_per_prompt", "keep_per_prompt", "http_concurrency"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        need(self.calibration_prompts >= 1, "calibration_prompts", "must be at least 1")
        need(self.kl_temperature > 0, "kl_temperature", "must be positive")
        need(0 <= self.ce_weight <= 1, "ce_weight", "must be between 0 and 1")
        need(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        need(self.http_timeout > 0, "http_timeout", "must be positive")


# Used when no recipe says otherwise. A student from scratch learns like a pretraining run would, so
# the learning rate is a pretraining one; a recipe's [distill.train] can say otherwise.
TRAIN_DEFAULTS = {"steps": 300, "batch_size": 16, "seq_len": 512, "lr": 2e-3, "warmup_steps": 20, "schedule": "cosine",
                  "weight_decay": 0.0, "log_every": 10, "eval_every": 100, "eval_batches": 10}


schema = stage_schema(model=True, distill=DistillConfig)


STAGE = Stage("distill", schema, TRAIN_DEFAULTS, lora=True)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    from daulat.train.common import add_common_arguments

    parser.add_argument("--teacher", required=True, metavar="CKPT_OR_URL",
                        help="teacher checkpoint, or the http(s):// URL of an OpenAI-compatible API (sft only); "
                             "an API key is read from $DAULAT_TEACHER_API_KEY")
    parser.add_argument("--student", metavar="CKPT", help="checkpoint to distill into (default: a fresh model of --preset)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--task", metavar="NAME", help="a built-in task (see `daulat tasks`) or a .jsonl task file")
    source.add_argument("--data", metavar="FILE.jsonl", help='conversations, one {"messages": [...]} per line')
    parser.add_argument("--mode", choices=list(MODES), help="sft: teacher answers; fkl: forward KL on sequences; "
                                                             "rkl: on-policy reverse KL (default: distill.mode, sft)")
    parser.add_argument("--out", required=True, help="run directory: teacher answers, checkpoints and metrics")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer of a fresh student (default: the teacher's)")
    parser.add_argument("--teacher-model", metavar="NAME", help="model name to ask an HTTP teacher for "
                                                                "(distill.teacher_model; default: the first listed)")
    parser.add_argument("--generate-only", action="store_true",
                        help="write the teacher's answers (OUT/teacher_data.jsonl) and stop")
    add_common_arguments(parser, default_preset=None, lora=True)


def run(args) -> int:
    from daulat.train.common import FLAG, run_command

    flags = {"mode": "distill.mode", "teacher_model": "distill.teacher_model",
             "task": {"distill.task": FLAG, "distill.data": None}, "data": {"distill.data": FLAG, "distill.task": None}}

    def start(config):
        if args.student is None and args.preset is None:
            raise DaulatError("give the student: --student CKPT, or --preset NAME for a fresh one")
        distill(config, args.teacher, args.out, student=args.student, preset=args.preset, tokenizer=args.tokenizer,
                resume=args.resume, generate_only=args.generate_only)

    return run_command(STAGE, args, flags, start)


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------


def distill(config: dict, teacher, out, student=None, preset: str | None = None, tokenizer=None,
            resume: bool = False, generate_only: bool = False, verbose: bool = True) -> dict:
    """Distill `teacher` (a checkpoint path, a URL, or a teacher object from daulat.teacher) into
    `student` (a checkpoint path; None: a fresh model of config["model"]); returns the loop's summary.

    config: {"model": ModelConfig, "train": TrainConfig, "distill": DistillConfig}.
    """
    train_cfg, cfg = config["train"], config["distill"]
    mode = MODES[cfg.mode]
    run = StageRun(STAGE, config, out, resume=resume, verbose=verbose,
                   single_process="--mode rkl runs in one process for now (the student samples with the engine); "
                                  "start it without torchrun" if mode.on_policy else None)

    # Check every input before writing anything.
    if cfg.sequences == "given" and not mode.given_ok and not mode.on_policy:
        raise DaulatError("distill.sequences = 'given' is plain fine-tuning: use `daulat sft`, or --mode fkl")
    if isinstance(teacher, (str, os.PathLike)):
        from daulat.teacher import open_teacher

        teacher = open_teacher(str(teacher), device=run.dist.device, model_name=cfg.teacher_model,
                               concurrency=cfg.http_concurrency, timeout=cfg.http_timeout)
    if mode.needs_logits and not teacher.has_logits:
        raise DaulatError(f"--mode {cfg.mode} needs the teacher's full next-token distribution, which an HTTP endpoint "
                          f"does not give: use a local teacher checkpoint, or --mode sft")
    prompts, task, prompt_source = load_prompts(cfg)
    model, tok, parent, init = _student(run, teacher, student, preset, tokenizer, prompts)
    if mode.needs_logits:
        _check_same_vocabulary(cfg.mode, teacher, model, tok)
    _check_sequences(run, mode, cfg, teacher, model, prompts, generate_only)
    run.prepare_output()

    data_info, compute, metrics = {"prompts": prompt_source}, {}, {}
    if mode.on_policy:
        batches, val_batches, batch_tokens = _on_policy_batches(run, cfg, teacher, model, tok, prompts, task, data_info)
    else:
        conversations = _sequences(run, mode, cfg, teacher, prompts, task, prompt_source, data_info, compute, metrics)
        if generate_only:
            run.say(f"wrote {len(conversations)} conversations to {run.out / DATASET_FILE}")
            return {"step": 0, "out": str(run.out), "conversations": len(conversations)}
        batches, val_batches, batch_tokens = _row_batches(run, mode, cfg, tok, conversations, data_info)
    teacher_info = teacher.describe()
    size = f"{model.num_parameters():,} parameters ({model.num_parameters(active=True):,} active per token)"
    if teacher_info.get("parameters"):
        size += f"; teacher {teacher_info['parameters'] / model.num_parameters():.1f}x larger"
    run.say(f"student: {size}; {train_cfg.batch_size} sequences per step on {run.dist.world_size} x {run.dist.device.type}")
    return run.train(Training(model, mode.objective(teacher, tok.vocab_size, cfg), batches, tok, mode.method, data_info,
                              parent=parent, extra={"mode": cfg.mode, "teacher": teacher_info, "init": init},
                              compute=compute, metrics=metrics, val_batches=val_batches, batch_tokens=batch_tokens))


def _student(run: StageRun, teacher, student, preset, tokenizer, prompts):
    """(model, tokenizer, parent record, init description) of the student: a checkpoint, or a fresh
    model of config["model"] with the teacher's (or `tokenizer`'s) tokenizer, whose lineage is the
    teacher's: random weights, or the teacher pruned to that shape (distill.student_init)."""
    import torch

    from daulat.architectures import build_model
    from daulat.tokenizer import load_tokenizer

    if student is not None:
        model, tok, parent = run.load_trainable(student)
        return model, tok, parent or None, str(student)
    if getattr(run.config.get("lora"), "enabled", False):
        raise DaulatError("lora.rank is set but the student is fresh: LoRA adapts a checkpoint (give --student CKPT)")
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif teacher.tokenizer is not None:
        tok = teacher.tokenizer
    else:
        raise DaulatError("a fresh student needs a tokenizer: give --tokenizer DIR (an HTTP teacher has none to "
                          "lend), or --student CKPT")
    pruned = run.config["distill"].student_init == "pruned"
    if pruned and not teacher.has_logits:
        raise DaulatError("distill.student_init = 'pruned' cuts the teacher's own weights: give a local teacher checkpoint")
    # a pruned student keeps the teacher's embedding rows; a random one has as many as the tokenizer
    vocab_size = teacher.model.config.vocab_size if pruned else tok.vocab_size
    model_cfg = dataclasses.replace(run.config["model"], vocab_size=vocab_size)
    run.config = dict(run.config, model=model_cfg)  # the record shows the student as it was built
    torch.manual_seed(run.train_cfg.seed)
    parent = getattr(teacher, "info", None) or None  # a fresh student's knowledge comes from the teacher
    shape = f"preset {preset}" if preset else "its [model]"
    if pruned:
        model, kept = _pruned_student(teacher, model_cfg, tok, prompts[:run.config["distill"].calibration_prompts],
                                      run.train_cfg.seq_len)
        run.say(f"student: the teacher pruned to {shape}: layers {kept['layers']}, calibration loss "
                f"{kept['teacher_loss']} (teacher) -> {kept['student_loss']} (pruned)")
        return model, tok, parent, {"pruned from the teacher to": shape, **kept}
    return build_model(model_cfg), tok, parent, f"fresh from {shape}"


def _pruned_student(teacher, model_cfg, tok, prompts, seq_len: int):
    """The teacher cut down to `model_cfg` (daulat.prune), judged on the prompts' conversations (their
    given answers where they have them)."""
    import torch

    from daulat.prune import prune

    rows = [tok.render_chat(p.given or p.messages)[0][:seq_len] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return prune(teacher.model, model_cfg, ids, mask)


def _check_same_vocabulary(mode: str, teacher, model, tok) -> None:
    """Logit-level modes compare distributions token by token: one tokenizer, and vocabularies that hold it."""
    if teacher.tokenizer.sha256 != tok.sha256:
        raise DaulatError(f"--mode {mode} needs one tokenizer for teacher and student, but they differ (teacher: "
                          f"{teacher.tokenizer.vocab_size} tokens, sha256 {teacher.tokenizer.sha256[:12]}; student: "
                          f"{tok.vocab_size} tokens, sha256 {tok.sha256[:12]}); use --mode sft, which works "
                          f"across tokenizers")
    for who, m in (("teacher", teacher.model), ("student", model)):
        if m.config.vocab_size < tok.vocab_size:
            raise DaulatError(f"the {who}'s vocab_size ({m.config.vocab_size}) is smaller than its tokenizer's "
                              f"({tok.vocab_size})")


def _check_sequences(run: StageRun, mode: Mode, cfg, teacher, model, prompts, generate_only: bool) -> None:
    """Rows must fit the contexts that read them; given sequences must exist; --generate-only needs teacher answers."""
    if not mode.on_policy:
        limits = [("student", model.config.max_position_embeddings)]
        if mode.needs_logits:
            limits.append(("teacher", teacher.model.config.max_position_embeddings))
        whose, limit = min(limits, key=lambda w: w[1])
        run.check_context(run.train_cfg.seq_len, limit, whose=f"the context of the {whose}")
    if mode.sequences(cfg) == "given" and any(p.given is None for p in prompts):
        raise DaulatError("distill.sequences = 'given' needs conversations that end in an answer")
    if generate_only and mode.sequences(cfg) != "teacher":
        raise DaulatError("--generate-only writes teacher answers: it goes with --mode sft, or fkl on teacher sequences")


def _sequences(run: StageRun, mode: Mode, cfg, teacher, prompts, task, prompt_source, data_info, compute, metrics):
    """The conversations the student trains on: the teacher's accepted answers (written to OUT once,
    on the main rank) or the data as given."""
    from daulat.data.conversations import read_conversations
    from daulat.train.loop import run_on_main

    if mode.sequences(cfg) == "given":
        return [p.given for p in prompts]
    request = SampleRequest(cfg.teacher_sampling, n=cfg.samples_per_prompt, seed=run.train_cfg.seed)
    run_on_main(run.dist, lambda: teacher_dataset(teacher, prompts, task, cfg, request, run.out, prompt_source, run.say))
    manifest = json.loads((run.out / MANIFEST_FILE).read_text(encoding="utf-8"))
    data_info.update(teacher_samples={k: manifest[k] for k in ("path", "sha256", "counts", "teacher_accuracy")},
                     sampling=request.to_dict())
    metrics["teacher_accuracy_on_prompts"] = manifest["teacher_accuracy"]
    compute["teacher_generation_s"] = manifest["generation_s"]
    return read_conversations(run.out / DATASET_FILE)


def _row_batches(run: StageRun, mode: Mode, cfg, tok, conversations, data_info):
    """(batches, val_batches, batch_tokens) over rows of conversations, as SFT makes them."""
    from daulat.data.conversations import ConversationBatches, conversation_rows, held_out_batches

    t, d = run.train_cfg, run.dist
    rows = conversation_rows(conversations, tok, t.seq_len, cfg.pack, cfg.val_fraction)
    batches = ConversationBatches(rows.train, t.micro_batch_size, tok.pad_id, seed=t.seed, rank=d.rank,
                                  world_size=d.world_size)
    val_batches = held_out_batches(rows.val, t.micro_batch_size, tok.pad_id, t.eval_batches, d.rank, d.world_size)
    c = rows.counts
    data_info.update({k: c[k] for k in ("conversations", "cut", "skipped", "rows", "packed", "val_conversations")},
                     sequences=mode.sequences(cfg), answer_tokens=c["assistant_tokens"])
    run.say(f"{cfg.mode}: {c['conversations'] - c['skipped']} conversations ({c['cut']} cut to {t.seq_len} tokens), "
            f"{c['assistant_tokens']:,} answer tokens trained on, {c['val_conversations']} held out")
    return batches, val_batches, lambda batch: int((batch[0] != tok.pad_id).sum())


def _on_policy_batches(run: StageRun, cfg, teacher, model, tok, prompts, task, data_info):
    """(batches, None, batch_tokens): the student's own answers, scored by the answer tokens."""
    max_len = min(model.config.max_position_embeddings, teacher.model.config.max_position_embeddings)
    batches = OnPolicyBatches(prompts, tok, run.train_cfg.micro_batch_size, cfg.student_sampling, max_len=max_len,
                              task=task, seed=run.train_cfg.seed)
    data_info.update(sequences="student samples (on-policy)", sampling=cfg.student_sampling.to_dict())
    return batches, None, lambda batch: int(batch["mask"].sum())
