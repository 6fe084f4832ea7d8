"""The teacher's side of distillation: the prompts (a task's, or a JSONL's), and the teacher's
answers to them as a dataset, OUT/teacher_data.jsonl (`{"messages": [...]}` rows, which `daulat sft
--data` also reads) with OUT/teacher_data.json saying who the teacher was, how it sampled and what
was kept. Answers the task's checker rejects, and answers cut off at max_tokens, are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from daulat.data.conversations import read_conversations
from daulat.errors import DaulatError
from daulat.generation import SampleRequest
from daulat.infer.engine.sequence import FINISH_LENGTH

DATASET_FILE = "teacher_data.jsonl"
MANIFEST_FILE = "teacher_data.json"


@dataclass
class Prompt:
    """A conversation up to the answer; the task example behind it (for the checker), if any; and the
    whole conversation as given (task worked solution, or the data's own answer), if any."""

    messages: list[dict]
    example: object | None = None
    given: list[dict] | None = None


def load_prompts(cfg) -> tuple[list[Prompt], object | None, dict]:
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


def teacher_dataset(teacher, prompts: list[Prompt], task, cfg, request: SampleRequest, out: Path,
                    prompt_source: dict, say=print) -> tuple[list[list[dict]], dict]:
    """The teacher's accepted answers as conversations, and the manifest of OUT/teacher_data.jsonl.

    Written once: a run that finds a dataset made by the same teacher, sampling and prompts reuses it.
    cfg: the [distill] section (filter, drop_truncated, keep_per_prompt).
    """
    wanted = {"teacher": teacher.describe(), "sampling": request.to_dict(), "prompts": prompt_source,
              "filter": bool(cfg.filter and task is not None), "drop_truncated": cfg.drop_truncated,
              "keep_per_prompt": cfg.keep_per_prompt}
    data_file, manifest_file = out / DATASET_FILE, out / MANIFEST_FILE
    reused = _reusable(data_file, manifest_file, wanted)
    if reused is not None:
        say(f"reusing the teacher's answers in {data_file} ({reused['counts']['kept']} conversations)")
        return read_conversations(data_file), reused

    started, last_said = time.time(), [0.0]

    def progress(done, total):
        if time.time() - last_said[0] > 10 or done == total:
            last_said[0] = time.time()
            say(f"teacher: {done}/{total} prompts answered ({time.time() - started:.0f}s)")

    answers = teacher.generate([p.messages for p in prompts], request, progress=progress)
    generation_s = time.time() - started
    checked = task is not None and all(p.example is not None for p in prompts)
    rows, counts, passed = _accepted(prompts, answers, task if checked else None, cfg)
    _write_atomic(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    manifest = {"format": "daulat-teacher-data", "version": 1, "request": wanted, "path": DATASET_FILE,
                "sha256": _sha256(data_file), "counts": counts, "generation_s": round(generation_s, 3),
                "teacher_accuracy": round(passed / counts["answers"], 4) if checked and counts["answers"] else None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_atomic(manifest_file, json.dumps(manifest, indent=2) + "\n")
    accuracy = f", {manifest['teacher_accuracy']:.1%} passed the checker" if checked else ""
    say(f"teacher: {counts['answers']} answers in {generation_s:.0f}s{accuracy}; kept {counts['kept']} "
        f"({counts['truncated']} cut off, {counts['rejected']} rejected, {counts['duplicates']} duplicates) -> {data_file}")
    return [r["messages"] for r in rows], manifest


def _reusable(data_file: Path, manifest_file: Path, wanted: dict) -> dict | None:
    """The manifest of an existing dataset made by the same request (and not altered since), else None."""
    if not (data_file.is_file() and manifest_file.is_file()):
        return None
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return manifest if _same_request(manifest.get("request"), wanted) and manifest.get("sha256") == _sha256(data_file) else None


def _same_request(made, wanted: dict) -> bool:
    """Whether a dataset made for request `made` answers `wanted`: the same everything, except that a
    teacher known by its weights' hash may have been read from another path (a moved or copied run)."""
    if not isinstance(made, dict) or not isinstance(made.get("teacher"), dict):
        return made == wanted
    a, b = dict(made["teacher"]), dict(wanted["teacher"])
    if a.get("weights_sha256") and a.get("weights_sha256") == b.get("weights_sha256"):
        a.pop("path", None), b.pop("path", None)
    return {**made, "teacher": a} == {**wanted, "teacher": b}


def _accepted(prompts: list[Prompt], answers: list, task, cfg) -> tuple[list[dict], dict, int]:
    """(rows, counts, answers that passed the checker): each prompt keeps up to keep_per_prompt distinct
    answers that were neither cut off (drop_truncated) nor rejected by the task's checker (filter).
    task None: no checker (the prompts are not a task's)."""
    counts = {"prompts": len(prompts), "answers": 0, "truncated": 0, "rejected": 0, "duplicates": 0, "surplus": 0,
              "kept": 0, "prompts_with_an_answer": 0}
    rows, passed = [], 0
    for prompt, samples in zip(prompts, answers):
        kept: list[str] = []
        for sample in samples:
            counts["answers"] += 1
            ok = task.check(sample.text, prompt.example) if task is not None else None
            passed += bool(ok)
            if cfg.drop_truncated and sample.finish_reason == FINISH_LENGTH:
                counts["truncated"] += 1
            elif cfg.filter and ok is False:
                counts["rejected"] += 1
            elif sample.text in kept:
                counts["duplicates"] += 1
            elif len(kept) >= cfg.keep_per_prompt:
                counts["surplus"] += 1
            else:
                kept.append(sample.text)
                rows.append({"messages": prompt.messages + [{"role": "assistant", "content": sample.text}],
                             "passed_checker": ok})
        counts["prompts_with_an_answer"] += bool(kept)
    counts["kept"] = len(rows)
    if not rows:
        why = "failed the task checker" if counts["rejected"] else "were cut off at the teacher's max_tokens" \
            if counts["truncated"] else "were dropped"
        raise DaulatError(f"all {counts['answers']} teacher answers to {len(prompts)} prompts {why}: nothing to train "
                          f"on (is the teacher trained for this task?)")
    return rows, counts, passed


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
