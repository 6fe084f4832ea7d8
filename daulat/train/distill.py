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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from daulat.errors import DaulatError

MODES = ("sft", "fkl", "rkl")
SEQUENCES = ("teacher", "given")
RKL_ESTIMATORS = ("full", "sampled")
DATASET_FILE = "teacher_data.jsonl"
MANIFEST_FILE = "teacher_data.json"

METHODS = {
    "sft": "sequence-level distillation: supervised fine-tuning on teacher answers (filtered by the task checker "
           "where there is one)",
    "fkl": "logit-level distillation: forward KL to the teacher's temperature-scaled next-token distribution",
    "rkl": "on-policy distillation: reverse KL to the teacher on the student's own samples",
}


@dataclass
class DistillConfig:
    """The [distill] section (a recipe may also hold a [distill.train] table of train.* keys)."""

    mode: str = "sft"  # "sft", "fkl" or "rkl" (or give --mode)
    task: str | None = None  # a built-in task or a .jsonl task: its prompts, and its checker (or --task)
    data: str | None = None  # a JSONL of {"messages": [...]}: its prompts, or its sequences (or --data)
    difficulty: int | None = None  # the task's difficulty knob (default: the task's own)
    system: str | None = None  # a system prompt put before every task prompt
    prompts: int = 2000  # prompts drawn from the task's training split (every row of --data is used)
    sequences: str = "teacher"  # fkl: train on the teacher's answers ("teacher") or on the data as given ("given")
    # how the teacher answers (sft, and fkl on teacher sequences)
    samples_per_prompt: int = 1
    keep_per_prompt: int = 1  # distinct accepted answers kept per prompt
    teacher_temperature: float = 0.6
    teacher_top_p: float = 0.95
    teacher_max_tokens: int = 256
    filter: bool = True  # drop answers the task's checker rejects
    drop_truncated: bool = True  # drop answers cut off at teacher_max_tokens
    # the losses
    kl_temperature: float = 1.0  # fkl: T of the softened distributions (the loss is scaled by T^2)
    ce_weight: float = 0.0  # fkl: weight of the plain next-token loss on the same tokens
    rkl_estimator: str = "full"  # rkl: "full" (exact KL over the vocabulary) or "sampled" (policy gradient)
    # how the student answers (rkl)
    student_temperature: float = 1.0
    student_top_p: float = 1.0
    student_max_tokens: int = 128
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
        need(self.rkl_estimator in RKL_ESTIMATORS, "rkl_estimator", f"must be one of {', '.join(RKL_ESTIMATORS)}")
        for name in ("prompts", "samples_per_prompt", "keep_per_prompt", "teacher_max_tokens", "student_max_tokens",
                     "http_concurrency"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        need(self.kl_temperature > 0, "kl_temperature", "must be positive")
        need(0 <= self.ce_weight <= 1, "ce_weight", "must be between 0 and 1")
        need(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        need(0 <= self.teacher_temperature <= 100, "teacher_temperature", "must be between 0 and 100")
        need(0 <= self.student_temperature <= 100, "student_temperature", "must be between 0 and 100")
        need(0 < self.teacher_top_p <= 1, "teacher_top_p", "must be in (0, 1]")
        need(0 < self.student_top_p <= 1, "student_top_p", "must be in (0, 1]")
        need(self.http_timeout > 0, "http_timeout", "must be positive")


# Used when no recipe says otherwise. A student from scratch learns like a pretraining run would, so
# the learning rate is a pretraining one; a recipe's [distill.train] can say otherwise.
TRAIN_DEFAULTS = {"steps": 300, "batch_size": 16, "seq_len": 512, "lr": 2e-3, "warmup_steps": 20, "schedule": "cosine",
                  "weight_decay": 0.0, "log_every": 10, "eval_every": 100, "eval_batches": 10}


def schema() -> dict[str, type]:
    from daulat.model import ModelConfig
    from daulat.train.loop import TrainConfig

    return {"model": ModelConfig, "train": TrainConfig, "distill": DistillConfig}


# ------------------------------------------------------------------------------------------------
# The losses, per position: rows of logits [N, V] -> [N]
# ------------------------------------------------------------------------------------------------


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """T^2 * KL(p_t || p_s) with p = softmax(logits / T), per row: [N, V], [N, V] -> [N].

    The T^2 keeps the gradient's size independent of T (Hinton et al. 2015). Mass-covering: the
    student is pushed to put probability wherever the teacher does."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * temperature**2


def reverse_kl(student_logits, teacher_logits):
    """KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v)), per row: [N, V], [N, V] -> [N].

    Mode-seeking: the student is pushed off the tokens the teacher finds unlikely, which is what an
    on-policy student needs (its own mistakes are where it learns)."""
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (s.exp() * (s - t)).sum(-1)


def reverse_kl_policy_gradient(student_logprobs, teacher_logprobs):
    """The policy-gradient surrogate of the reverse KL on sampled tokens, per token: [N], [N] -> [N].

    student_logprobs: log p_s of each sampled token (with gradient); teacher_logprobs: log p_t of it.
    The reward of a token is -(log p_s - log p_t) (detached); minimising -reward * log p_s has, over
    tokens drawn from p_s, the expected gradient of KL(p_s || p_t) at that position. Its value is not
    the KL; the KL estimate is log p_s - log p_t itself."""
    reward = -(student_logprobs - teacher_logprobs).detach()
    return -reward * student_logprobs


def _balance_loss(model):
    """The student's sequence-wise MoE balance loss of its last forward (0 when switched off)."""
    terms = [m.aux_loss for m in model.moe_layers() if m.aux_loss is not None]
    return sum(terms) if terms else 0.0


class ForwardKLObjective:
    """fkl: batches (inputs, targets) [B, T] with targets -100 off the answer tokens (SFT's rows).
    One teacher forward per batch; the loss is taken on the answer positions only."""

    def __init__(self, teacher, vocab_size: int, temperature: float = 1.0, ce_weight: float = 0.0):
        self.teacher, self.vocab_size = teacher, vocab_size
        self.temperature, self.ce_weight = temperature, ce_weight

    def __call__(self, model, batch):
        import torch.nn.functional as F

        from daulat.train.sft import IGNORE_INDEX

        inputs, targets = batch
        mask = targets != IGNORE_INDEX
        teacher_logits = self.teacher.logits(inputs)
        student_logits = model(inputs)
        V = self.vocab_size
        s, t = student_logits[mask][:, :V], teacher_logits[mask][:, :V]  # [M, V]: the answer positions
        if s.shape[0] == 0:
            zero = student_logits.sum() * 0.0
            return zero, {"kl": zero.detach(), "ce": zero.detach()}
        kl = forward_kl(s, t, self.temperature).mean()
        ce = F.cross_entropy(s.float(), targets[mask])
        loss = (1 - self.ce_weight) * kl + self.ce_weight * ce + _balance_loss(model)
        return loss, {"kl": kl.detach(), "ce": ce.detach()}


class ReverseKLObjective:
    """rkl: batches {"input_ids" [B, L], "mask" [B, L-1]} of prompts + the student's own answers, mask 1
    where position t predicts an answer token. One teacher forward per batch."""

    def __init__(self, teacher, vocab_size: int, estimator: str = "full"):
        self.teacher, self.vocab_size, self.estimator = teacher, vocab_size, estimator

    def __call__(self, model, batch):
        import torch.nn.functional as F

        ids, mask = batch["input_ids"], batch["mask"].bool()
        inputs = ids[:, :-1]
        teacher_logits = self.teacher.logits(inputs)
        student_logits = model(inputs)
        V = self.vocab_size
        s, t = student_logits[mask][:, :V].float(), teacher_logits[mask][:, :V].float()  # [M, V]
        tokens = ids[:, 1:][mask]  # [M]: the sampled tokens
        logp_s, logp_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        sampled_s = logp_s.gather(-1, tokens[:, None])[:, 0]
        sampled_t = logp_t.gather(-1, tokens[:, None])[:, 0]
        full = (logp_s.exp() * (logp_s - logp_t)).sum(-1)  # [M]
        if self.estimator == "full":
            loss = full.mean()
        else:
            loss = reverse_kl_policy_gradient(sampled_s, sampled_t).mean()
        stats = {"rkl": full.mean().detach(), "rkl_sampled": (sampled_s - sampled_t).mean().detach(),
                 "teacher_logprob": sampled_t.mean().detach(), "answer_tokens": mask.sum(1).float().mean()}
        for key in ("stopped", "correct"):
            if key in batch:
                stats[f"sample_{key}"] = batch[key].float().mean()
        return loss + _balance_loss(model), stats


# ------------------------------------------------------------------------------------------------
# Prompts, and the teacher's answers to them
# ------------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """A conversation up to the answer; the task example behind it (for the checker), if any; and the
    whole conversation as given (task worked solution, or the data's own answer), if any."""

    messages: list[dict]
    example: object | None = None
    given: list[dict] | None = None


def load_prompts(cfg: DistillConfig) -> tuple[list[Prompt], object | None, dict]:
    """(prompts, task or None, a description of where they came from)."""
    if cfg.task and cfg.data:
        raise DaulatError("give the prompts either as a task (--task) or as conversations (--data), not both")
    if cfg.task:
        from daulat.data.tasks import get_task

        task = get_task(cfg.task)
        head = [{"role": "system", "content": cfg.system}] if cfg.system else []
        prompts = []
        for e in task.train_examples(cfg.prompts, seed=0, difficulty=cfg.difficulty):
            messages = head + [{"role": "user", "content": e.prompt}]
            prompts.append(Prompt(messages, e, messages + [{"role": "assistant", "content": e.solution_text}]))
        return prompts, task, {"builtin": f"daulat.data.tasks:{task.name}", "task": task.name, "prompts": len(prompts),
                               "difficulty": cfg.difficulty, "split": "train (the held-out eval split is never used)"}
    if cfg.data:
        from daulat.train.sft import read_conversations

        path = Path(cfg.data)
        prompts = []
        for messages in read_conversations(path):
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            head = messages[:last] if last is not None else messages
            if head and head[-1]["role"] != "assistant":
                prompts.append(Prompt(head, None, messages if last is not None else None))
        if not prompts:
            raise DaulatError(f"{path}: no conversation has a prompt to answer")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return prompts, None, {"sources": [{"path": str(path), "sha256": digest}], "prompts": len(prompts)}
    raise DaulatError("no prompts: give --task NAME or --data FILE.jsonl")


def teacher_dataset(teacher, prompts: list[Prompt], task, cfg: DistillConfig, sampling, out: Path, prompt_source: dict,
                    say=print) -> tuple[list[list[dict]], dict]:
    """The teacher's accepted answers as conversations, and the manifest of OUT/teacher_data.jsonl.

    Written once: a run that finds a dataset made by the same teacher, sampling and prompts reuses it.
    """
    request = {"teacher": teacher.describe(), "sampling": sampling.to_dict(), "prompts": prompt_source,
               "filter": bool(cfg.filter and task is not None), "drop_truncated": cfg.drop_truncated,
               "keep_per_prompt": cfg.keep_per_prompt}
    data_file, manifest_file = out / DATASET_FILE, out / MANIFEST_FILE
    if data_file.is_file() and manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = {}
        if manifest.get("request") == request and manifest.get("sha256") == _sha256(data_file):
            from daulat.train.sft import read_conversations

            say(f"reusing the teacher's answers in {data_file} ({manifest['counts']['kept']} conversations)")
            return read_conversations(data_file), manifest

    started, last_said = time.time(), [0.0]

    def progress(done, total):
        if time.time() - last_said[0] > 10 or done == total:
            last_said[0] = time.time()
            say(f"teacher: {done}/{total} prompts answered ({time.time() - started:.0f}s)")

    answers = teacher.generate([p.messages for p in prompts], sampling, progress=progress)
    generation_s = time.time() - started
    counts = {"prompts": len(prompts), "answers": 0, "truncated": 0, "rejected": 0, "duplicates": 0, "surplus": 0,
              "kept": 0, "prompts_with_an_answer": 0}
    checked = task is not None and all(p.example is not None for p in prompts)
    rows, conversations, passed = [], [], 0
    for prompt, samples in zip(prompts, answers):
        kept: list[str] = []
        for sample in samples:
            counts["answers"] += 1
            ok = task.check(sample.text, prompt.example) if checked else None
            passed += bool(ok)
            if cfg.drop_truncated and sample.finish_reason == "length":
                counts["truncated"] += 1
            elif cfg.filter and ok is False:
                counts["rejected"] += 1
            elif sample.text in kept:
                counts["duplicates"] += 1
            elif len(kept) >= cfg.keep_per_prompt:
                counts["surplus"] += 1
            else:
                kept.append(sample.text)
                messages = prompt.messages + [{"role": "assistant", "content": sample.text}]
                conversations.append(messages)
                rows.append({"messages": messages, "passed_checker": ok})
        counts["prompts_with_an_answer"] += bool(kept)
    counts["kept"] = len(rows)
    if not rows:
        why = "failed the task checker" if counts["rejected"] else "were cut off at teacher_max_tokens" \
            if counts["truncated"] else "were dropped"
        raise DaulatError(f"all {counts['answers']} teacher answers to {len(prompts)} prompts {why}: nothing to train "
                          f"on (is the teacher trained for this task?)")
    _write_atomic(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    manifest = {"format": "daulat-teacher-data", "version": 1, "request": request, "path": DATASET_FILE,
                "sha256": _sha256(data_file), "counts": counts, "generation_s": round(generation_s, 3),
                "teacher_accuracy": round(passed / counts["answers"], 4) if checked and counts["answers"] else None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_atomic(manifest_file, json.dumps(manifest, indent=2) + "\n")
    accuracy = f", {manifest['teacher_accuracy']:.1%} passed the checker" if checked else ""
    say(f"teacher: {counts['answers']} answers in {generation_s:.0f}s{accuracy}; kept {counts['kept']} "
        f"({counts['truncated']} cut off, {counts['rejected']} rejected, {counts['duplicates']} duplicates) -> {data_file}")
    return conversations, manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# rkl's batch source: the student answers, as it is now
# ------------------------------------------------------------------------------------------------


class OnPolicyBatches:
    """Each batch: `batch_size` prompts (a seeded permutation per epoch, resumable by position) answered
    by the current student with the engine, as {"input_ids" [B, L], "mask" [B, L-1], "stopped" [B],
    ("correct" [B] where the task has a checker)}. Set `model` to the trained model before use."""

    def __init__(self, prompts: list[Prompt], tokenizer, batch_size: int, *, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int = 128, max_len: int = 1024, task=None, seed: int = 0):
        if not prompts:
            raise DaulatError("no prompts for the student to answer")
        self.prompts, self.tokenizer, self.batch_size, self.task, self.seed = prompts, tokenizer, batch_size, task, seed
        self.ids = [tokenizer.render_chat(p.messages, add_generation_prompt=True)[0] for p in prompts]
        longest = max(len(i) for i in self.ids)
        if longest >= max_len:
            raise DaulatError(f"a prompt has {longest} tokens, which leaves no room for an answer in the "
                              f"{max_len}-token context")
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.max_len = min(max_len, longest + max_tokens + 1)
        self.model, self._engine = None, None
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        import torch

        from daulat.infer import SamplingParams
        from daulat.teacher import make_engine

        if self.model is None:
            raise RuntimeError("OnPolicyBatches.model is not set")
        picked, seeds = [], []
        while len(picked) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            picked.append(self._order[self.index])
            seeds.append(hash((self.seed, self.epoch, self.index)) % 2**62)  # ints hash stably
            self.index += 1
        was_training = self.model.training  # the engine puts the model in eval mode
        try:
            if self._engine is None:
                self._engine = make_engine(self.model, self.tokenizer, max_num_seqs=self.batch_size,
                                           max_model_len=self.max_len)
            params = [SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=seed,
                                     max_tokens=min(self.max_tokens, self.max_len - len(self.ids[i])))
                      for i, seed in zip(picked, seeds)]
            results = self._engine.generate([self.ids[i] for i in picked], params)
        finally:
            self.model.train(was_training)
        rows = [self.ids[i] + r.token_ids for i, r in zip(picked, results)]
        L = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), L), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L - 1)
        for b, (i, row) in enumerate(zip(picked, rows)):
            input_ids[b, : len(row)] = torch.tensor(row)
            mask[b, len(self.ids[i]) - 1 : len(row) - 1] = 1.0  # positions that predict an answer token
        batch = {"input_ids": input_ids, "mask": mask,
                 "stopped": torch.tensor([float(r.finish_reason == "stop") for r in results])}
        if self.task is not None:
            batch["correct"] = torch.tensor([float(self.task.check(r.text, self.prompts[i].example))
                                             for i, r in zip(picked, results)])
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index, "prompts": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("prompts") != len(self.prompts):
            raise DaulatError(f"cannot resume the prompt stream: it was saved over {state.get('prompts')} prompts, "
                              f"now there are {len(self.prompts)} (did the data or distill.* settings change?)")
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


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
    parser.add_argument("--mode", choices=MODES, help="sft: teacher answers; fkl: forward KL on sequences; "
                                                       "rkl: on-policy reverse KL (default: distill.mode, sft)")
    parser.add_argument("--out", required=True, help="run directory: teacher answers, checkpoints and metrics")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer of a fresh student (default: the teacher's)")
    parser.add_argument("--teacher-model", metavar="NAME", help="model name to ask an HTTP teacher for "
                                                                "(distill.teacher_model; default: the first listed)")
    parser.add_argument("--generate-only", action="store_true",
                        help="write the teacher's answers (OUT/teacher_data.jsonl) and stop")
    add_common_arguments(parser, default_preset=None)


def run(args) -> int:
    from daulat.train.sft import stage_config

    config = stage_config(schema(), args, "distill", TRAIN_DEFAULTS)
    cfg = config["distill"]
    for flag, key in (("mode", "mode"), ("teacher_model", "teacher_model")):
        if getattr(args, flag, None):
            setattr(cfg, key, getattr(args, flag))
    if args.task:
        cfg.task, cfg.data = args.task, None
    if args.data:
        cfg.data, cfg.task = args.data, None
    if args.print_config:
        from daulat.config import to_toml

        print(to_toml(config), end="")
        return 0
    if args.student is None and args.preset is None:
        raise DaulatError("give the student: --student CKPT, or --preset NAME for a fresh one")
    distill(config, args.teacher, args.out, student=args.student, preset=args.preset, tokenizer=args.tokenizer,
            resume=args.resume, generate_only=args.generate_only)
    return 0


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------


def distill(config: dict, teacher, out, student=None, preset: str | None = None, tokenizer=None,
            resume: bool = False, generate_only: bool = False, verbose: bool = True) -> dict:
    """Distill `teacher` (a checkpoint path, a URL, or a teacher object from daulat.teacher) into
    `student` (a checkpoint path; None: a fresh model of config["model"]); returns the loop's summary.

    config: {"model": ModelConfig, "train": TrainConfig, "distill": DistillConfig}.
    """
    import torch

    from daulat.checkpoint import load_info, load_model
    from daulat.config import to_dict
    from daulat.model import DeepseekV3
    from daulat.provenance import stage_info
    from daulat.teacher import TeacherSampling, open_teacher
    from daulat.tokenizer import load_tokenizer
    from daulat.train.common import prepare_output
    from daulat.train.loop import Trainer, init_distributed, latest_checkpoint, run_on_main
    from daulat.train.sft import (ConversationBatches, collate, encode_conversations, pack_examples,
                                  read_conversations, sft_objective)

    train_cfg, cfg = config["train"], config["distill"]
    mode = cfg.mode
    d = init_distributed(train_cfg.device)
    say = print if (verbose and d.is_main) else (lambda *a, **k: None)

    # Check every input before writing anything.
    if mode == "sft" and cfg.sequences == "given":
        raise DaulatError("distill.sequences = 'given' is plain fine-tuning: use `daulat sft`, or --mode fkl")
    if mode == "rkl" and d.distributed:
        raise DaulatError("--mode rkl runs in one process for now (the student samples with the engine); "
                          "start it without torchrun")
    if train_cfg.micro_batch_size % d.world_size:
        raise DaulatError(f"train.batch_size / train.grad_accum = {train_cfg.micro_batch_size} is not divisible "
                          f"by the {d.world_size} data-parallel ranks")
    if isinstance(teacher, (str, os.PathLike)):
        teacher = open_teacher(str(teacher), device=d.device, model_name=cfg.teacher_model,
                               concurrency=cfg.http_concurrency, timeout=cfg.http_timeout)
    needs_logits = mode in ("fkl", "rkl")
    if needs_logits and not teacher.has_logits:
        raise DaulatError(f"--mode {mode} needs the teacher's full next-token distribution, which an HTTP endpoint "
                          f"does not give: use a local teacher checkpoint, or --mode sft")

    if student is not None:
        tok = load_tokenizer(student)
        model = load_model(student)
        parent = load_info(student) or None
        init = str(student)
    else:
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
        elif teacher.tokenizer is not None:
            tok = teacher.tokenizer
        else:
            raise DaulatError("a fresh student needs a tokenizer: give --tokenizer DIR (an HTTP teacher has none to "
                              "lend), or --student CKPT")
        model_cfg = dataclasses.replace(config["model"], vocab_size=tok.vocab_size)
        config = dict(config, model=model_cfg)
        torch.manual_seed(train_cfg.seed)
        model = DeepseekV3(model_cfg)
        parent = getattr(teacher, "info", None) or None  # a fresh student's knowledge comes from the teacher
        init = f"fresh from preset {preset}" if preset else "fresh"
    if needs_logits:
        if teacher.tokenizer.sha256 != tok.sha256:
            raise DaulatError(f"--mode {mode} needs one tokenizer for teacher and student, but they differ (teacher: "
                              f"{teacher.tokenizer.vocab_size} tokens, sha256 {teacher.tokenizer.sha256[:12]}; student: "
                              f"{tok.vocab_size} tokens, sha256 {tok.sha256[:12]}); use --mode sft, which works "
                              f"across tokenizers")
        for who, m in (("teacher", teacher.model), ("student", model)):
            if m.config.vocab_size < tok.vocab_size:
                raise DaulatError(f"the {who}'s vocab_size ({m.config.vocab_size}) is smaller than its tokenizer's "
                                  f"({tok.vocab_size})")
    limits = [model.config.max_position_embeddings] + ([teacher.model.config.max_position_embeddings] if needs_logits else [])
    seq_len = train_cfg.seq_len
    if mode != "rkl" and seq_len > min(limits):
        raise DaulatError(f"config train.seq_len = {seq_len} exceeds the context of the "
                          f"{'student' if model.config.max_position_embeddings == min(limits) else 'teacher'} ({min(limits)})")
    prompts, task, prompt_source = load_prompts(cfg)
    if mode == "fkl" and cfg.sequences == "given" and any(p.given is None for p in prompts):
        raise DaulatError("distill.sequences = 'given' needs conversations that end in an answer")
    if generate_only and not (mode == "sft" or (mode == "fkl" and cfg.sequences == "teacher")):
        raise DaulatError("--generate-only writes teacher answers: it goes with --mode sft, or fkl on teacher sequences")

    out = Path(run_on_main(d, lambda: prepare_output(out, resume)) or out)
    resume_from = latest_checkpoint(out) if resume else None
    if resume and resume_from is None:
        say(f"no checkpoint in {out} yet: starting from the beginning")

    teacher_info = teacher.describe()
    data_info: dict = {"prompts": prompt_source}
    metrics: dict = {}
    compute: dict = {}
    batches = val_batches = None
    V = tok.vocab_size

    if mode in ("sft", "fkl"):
        if mode == "sft" or cfg.sequences == "teacher":
            sampling = TeacherSampling(n=cfg.samples_per_prompt, temperature=cfg.teacher_temperature,
                                       top_p=cfg.teacher_top_p, max_tokens=cfg.teacher_max_tokens, seed=train_cfg.seed)
            run_on_main(d, lambda: teacher_dataset(teacher, prompts, task, cfg, sampling, out, prompt_source, say))
            conversations = read_conversations(out / DATASET_FILE)
            manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
            data_info.update(teacher_samples={k: manifest[k] for k in ("path", "sha256", "counts", "teacher_accuracy")},
                             sampling=sampling.to_dict())
            metrics["teacher_accuracy_on_prompts"] = manifest["teacher_accuracy"]
            compute["teacher_generation_s"] = manifest["generation_s"]
            if generate_only:
                say(f"wrote {len(conversations)} conversations to {out / DATASET_FILE}")
                return {"step": 0, "out": str(out), "conversations": len(conversations)}
        else:
            conversations = [p.given for p in prompts]
        val_conversations = []
        if cfg.val_fraction > 0:
            from daulat.data.shards import is_val_document

            keyed = [(is_val_document(json.dumps(c, sort_keys=True), cfg.val_fraction), c) for c in conversations]
            conversations = [c for is_val, c in keyed if not is_val]
            val_conversations = [c for is_val, c in keyed if is_val]
        examples, counts = encode_conversations(conversations, tok, seq_len)
        if not examples:
            raise DaulatError(f"no conversation has an answer token within train.seq_len = {seq_len} tokens")
        rows = pack_examples(examples, seq_len) if cfg.pack else examples
        batches = ConversationBatches(rows, train_cfg.micro_batch_size, tok.pad_id, seed=train_cfg.seed,
                                      rank=d.rank, world_size=d.world_size)
        val_rows = encode_conversations(val_conversations, tok, seq_len)[0] if val_conversations else []
        if val_rows:
            share = train_cfg.micro_batch_size // d.world_size
            mine = val_rows[d.rank :: d.world_size] or val_rows[:1]

            def val_batches():
                n = len(mine) if not train_cfg.eval_batches else min(len(mine), train_cfg.eval_batches * share)
                return (collate(mine[i : i + share], tok.pad_id) for i in range(0, n, share))

        data_info.update(counts, rows=len(rows), packed=cfg.pack, val_conversations=len(val_conversations),
                         sequences="teacher" if mode == "sft" else cfg.sequences,
                         answer_tokens=sum(sum(mask[1:]) for _, mask in examples))
        if mode == "sft":
            objective = sft_objective
        else:
            objective = ForwardKLObjective(teacher, V, cfg.kl_temperature, cfg.ce_weight)
        batch_tokens = lambda batch: int((batch[0] != tok.pad_id).sum())  # noqa: E731
        say(f"{mode}: {len(examples)} conversations ({counts['cut']} cut to {seq_len} tokens), "
            f"{data_info['answer_tokens']:,} answer tokens trained on, {len(val_conversations)} held out")
    else:
        batches = OnPolicyBatches(prompts, tok, train_cfg.micro_batch_size, temperature=cfg.student_temperature,
                                  top_p=cfg.student_top_p, max_tokens=cfg.student_max_tokens,
                                  max_len=min(model.config.max_position_embeddings,
                                              teacher.model.config.max_position_embeddings),
                                  task=task, seed=train_cfg.seed)
        objective = ReverseKLObjective(teacher, V, cfg.rkl_estimator)
        data_info.update(sequences="student samples (on-policy)",
                         sampling={"temperature": cfg.student_temperature, "top_p": cfg.student_top_p,
                                   "max_tokens": cfg.student_max_tokens})
        batch_tokens = lambda batch: int(batch["mask"].sum())  # noqa: E731 - the answer tokens scored

    info = stage_info("distill", method=METHODS[mode], config=to_dict(config), data=data_info, compute=compute,
                      metrics=metrics, parent=parent, mode=mode, teacher=teacher_info, init=init,
                      tokenizer_sha256=tok.sha256, parameters=model.num_parameters(),
                      active_parameters_per_token=model.num_parameters(active=True))
    size = f"{model.num_parameters():,} parameters ({model.num_parameters(active=True):,} active per token)"
    if teacher_info.get("parameters"):
        size += f"; teacher {teacher_info['parameters'] / model.num_parameters():.1f}x larger"
    say(f"student: {size}; {train_cfg.batch_size} sequences per step on {d.world_size} x {d.device.type}")
    trainer = Trainer(model, train_cfg, objective, batches, out, val_batches=val_batches, tokenizer=tok, info=info,
                      resume_from=resume_from, dist=d, batch_tokens=batch_tokens)
    if isinstance(batches, OnPolicyBatches):
        batches.model = trainer.model
    if resume_from is not None:
        say(f"resuming from {resume_from} (step {trainer.step})")
    summary = trainer.fit()
    loss = f"loss {summary['loss']:.4f}" if summary["loss"] is not None else "no steps run"
    say(f"distilled ({mode}) {summary['step']} steps in {summary['wall_time_s']:.0f}s: {loss} -> {out / 'final'}")
    summary["out"] = str(out)
    return summary
