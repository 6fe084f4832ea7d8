"""Distillation: the KL losses, the teacher-answer dataset and its filter, fkl/rkl end to end on the
training loop, the tokenizer check, and an HTTP teacher (`daulat serve` on loopback)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require

from daulat.cli import main
from daulat.data.tasks import get_task
from daulat.teacher import HTTPTeacher, Sample, api_base
from daulat.train.distill import (
    ForwardKLObjective, ReverseKLObjective, forward_kl, reverse_kl, reverse_kl_policy_gradient,
)

sys.path.insert(0, str(Path(__file__).parent))
from infer_fixtures import Server, checkpoint, make_checkpoint  # noqa: E402,F401  (checkpoint is a fixture)

# ------------------------------------------------------------------------------------------ the losses


def test_kl_losses_are_zero_at_the_teacher_and_positive_elsewhere():
    torch.manual_seed(0)
    teacher = torch.randn(32, 50) * 3
    for T in (1.0, 2.0):
        assert forward_kl(teacher, teacher, T).abs().max() < 1e-5
    assert reverse_kl(teacher, teacher).abs().max() < 1e-5
    student = teacher + torch.randn_like(teacher)
    assert (forward_kl(student, teacher) > 0).all() and (forward_kl(student, teacher, 2.0) > 0).all()
    assert (reverse_kl(student, teacher) > 0).all()
    # a shift of all logits leaves the distribution, hence the loss, unchanged
    assert forward_kl(teacher + 5.0, teacher).abs().max() < 1e-5


@pytest.mark.parametrize("loss", ["fkl", "fkl_T2", "rkl", "rkl_sampled"])
def test_gradients_pull_the_student_toward_the_teacher_on_two_tokens(loss):
    teacher = torch.log(torch.tensor([[0.8, 0.2]]))
    student = torch.zeros(1, 2, requires_grad=True)  # p_s = (0.5, 0.5)

    def value(s):
        if loss == "fkl":
            return forward_kl(s, teacher).sum()
        if loss == "fkl_T2":
            return forward_kl(s, teacher, 2.0).sum()
        if loss == "rkl":
            return reverse_kl(s, teacher).sum()
        # the policy-gradient form, its expectation taken exactly over both tokens
        logp_s, logp_t = s.log_softmax(-1)[0], teacher.log_softmax(-1)[0]
        return sum(logp_s[y].exp().detach() * reverse_kl_policy_gradient(logp_s[y], logp_t[y]) for y in range(2))

    (grad,) = torch.autograd.grad(value(student), student)
    assert grad[0, 0] < 0 < grad[0, 1]  # descent raises the teacher's likelier token
    if loss == "rkl_sampled":  # same expected gradient as the exact per-position reverse KL
        (exact,) = torch.autograd.grad(reverse_kl(student, teacher).sum(), student)
        assert torch.allclose(grad, exact, atol=1e-6)
    s = student.detach().clone().requires_grad_(True)
    for _ in range(300):
        (g,) = torch.autograd.grad(value(s), s)
        s = (s - 1.0 * g).detach().requires_grad_(True)
    assert torch.allclose(s.softmax(-1), torch.tensor([[0.8, 0.2]]), atol=0.02)


class _ModelTeacher:
    """A teacher object around an in-memory model (what LocalTeacher is, without the checkpoint)."""

    has_logits = True

    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)

    def logits(self, input_ids):
        with torch.no_grad():
            return self.model(input_ids)


def _micro(seed, **overrides):
    from daulat.config import read_preset
    from daulat.model import DeepseekV3, ModelConfig

    torch.manual_seed(seed)
    return DeepseekV3(ModelConfig(**{**read_preset("micro")["model"], **overrides}))


def test_objectives_are_zero_for_the_teacher_itself_and_positive_for_another_model():
    teacher_model = _micro(0)
    teacher = _ModelTeacher(teacher_model)
    same, other = _micro(0), _micro(1, hidden_size=32, num_hidden_layers=1, first_k_dense_replace=1)
    torch.manual_seed(0)
    ids = torch.randint(6, 300, (2, 12))
    targets = ids.roll(-1, 1).clone()
    targets[:, :5] = -100  # the prompt
    mask = torch.zeros(2, 11)
    mask[:, 4:] = 1
    fkl = ForwardKLObjective(teacher, vocab_size=300, temperature=2.0)
    rkl = ReverseKLObjective(teacher, vocab_size=300)
    assert fkl(same, (ids, targets))[0].item() == pytest.approx(0.0, abs=1e-5)
    assert rkl(same, {"input_ids": ids, "mask": mask})[0].item() == pytest.approx(0.0, abs=1e-5)
    loss, stats = fkl(other, (ids, targets))
    assert loss.item() > 0.01 and stats["ce"] > 0
    loss, stats = rkl(other, {"input_ids": ids, "mask": mask})
    assert loss.item() > 0.01 and stats["rkl"] > 0
    loss.backward()
    assert other.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher_model.parameters())  # the teacher never trains


# ------------------------------------------------------------------------------------------ sft from teacher answers


class _ScriptedTeacher:
    """Answers addition prompts: right for even-numbered prompts, wrong for the others, and cut off for
    every fifth; records what it was asked."""

    has_logits, tokenizer, kind = False, None, "scripted"

    def describe(self):
        return {"kind": self.kind, "name": "scripted addition teacher"}

    def generate(self, conversations, sampling, progress=None):
        task, out = get_task("addition"), []
        for i, messages in enumerate(conversations):
            prompt = messages[-1]["content"]
            a, b = (int(x) for x in prompt.removeprefix("What is ").removesuffix("?").split(" + "))
            answer = a + b if i % 2 == 0 else a + b + 1
            finish = "length" if i % 5 == 4 else "stop"
            out.append([Sample(f"Adding.\nAnswer: {answer}", finish)] * sampling.n)
        assert task is not None
        return out


def _config(*overrides, preset="micro"):
    """The config `daulat distill --preset PRESET OVERRIDES...` would run with."""
    from daulat.train.distill import STAGE

    return STAGE.config(preset=preset, overrides=overrides)


def test_sft_keeps_only_answers_that_pass_the_checker_and_trains_on_them(checkpoint, tmp_path):
    from daulat.train.distill import distill

    config = _config("distill.task=\"addition\"", "distill.prompts=20", "distill.samples_per_prompt=2", "train.steps=3", "train.batch_size=4",
                     "train.log_every=1", "train.eval_batches=0")
    out = tmp_path / "run"
    summary = distill(config, _ScriptedTeacher(), out, preset="micro", tokenizer=checkpoint, verbose=False)
    assert summary["step"] == 3 and (out / "final" / "model.safetensors").is_file()

    task = get_task("addition")
    examples = {e.prompt: e for e in task.train_examples(20, seed=0)}
    rows = [json.loads(line) for line in (out / "teacher_data.jsonl").read_text().splitlines()]
    # prompts 0, 2, ..., 18 are answered right, but 4 and 14 are cut off: 8 kept, one answer each (the
    # second, identical answer is a duplicate); prompts 9 and 19 are cut off, the other odd ones rejected
    assert len(rows) == 8
    for row in rows:
        user, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
        assert row["passed_checker"] is True and task.check(answer, examples[user])
    manifest = json.loads((out / "teacher_data.json").read_text())
    assert manifest["counts"] == {"prompts": 20, "answers": 40, "truncated": 8, "rejected": 16, "duplicates": 8,
                                  "surplus": 0, "kept": 8, "prompts_with_an_answer": 8}
    assert manifest["teacher_accuracy"] == 0.5
    assert manifest["request"]["teacher"]["kind"] == "scripted"
    assert manifest["request"]["sampling"]["n"] == 2

    info = json.loads((out / "final" / "daulat.json").read_text())
    assert info["stage"] == "distill" and info["mode"] == "sft" and info["teacher"]["kind"] == "scripted"
    assert info["data"]["teacher_samples"]["sha256"] == manifest["sha256"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # the dataset is what `daulat sft --data` reads, and a rerun with the same teacher and prompts reuses it
    from daulat.data.conversations import read_conversations

    assert len(read_conversations(out / "teacher_data.jsonl")) == 8


def test_a_fresh_student_from_a_checkpoint_teacher_records_its_lineage(checkpoint, tmp_path):
    """fkl and rkl from the CLI: a local teacher, a fresh (smaller) student of another shape."""
    shape = ["model.hidden_size=32", "model.num_hidden_layers=1", "model.first_k_dense_replace=0"]
    common = ["distill", "--teacher", str(checkpoint), "--preset", "micro", "--task", "addition", "--steps", "2"]
    settings = ["train.batch_size=4", "train.log_every=1", "train.eval_batches=0", "distill.prompts=8", *shape]
    assert main([*common, "--mode", "fkl", "--out", str(tmp_path / "fkl"), *settings, "distill.filter=false",
                 "distill.drop_truncated=false", "distill.teacher_sampling.max_tokens=8", "distill.kl_temperature=2.0",
                 "distill.ce_weight=0.5"]) == 0
    assert main([*common, "--mode", "rkl", "--out", str(tmp_path / "rkl"), *settings,
                 "distill.student_sampling.max_tokens=8"]) == 0
    for mode in ("fkl", "rkl"):
        info = json.loads((tmp_path / mode / "final" / "daulat.json").read_text())
        assert info["mode"] == mode and info["teacher"]["path"] == str(checkpoint)
        assert info["teacher"]["weights_sha256"] and info["config"]["model"]["hidden_size"] == 32
        assert [h["stage"] for h in info["history"]] == ["init"]  # the teacher's lineage is carried
        lines = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [1, 2]
        assert ("kl" if mode == "fkl" else "rkl") in lines[-1]
    rkl = lines[-1]
    assert rkl["rkl"] > 0 and 1 <= rkl["answer_tokens"] <= 8 and 0 <= rkl["sample_correct"] <= 1
    assert rkl["expert_load"][0] is not None  # sampling left the student in training mode


def test_on_policy_batches_resume_where_they_stopped(checkpoint):
    from daulat.checkpoint import load_model
    from daulat.tokenizer import load_tokenizer
    from daulat.generation import Sampling
    from daulat.train.distill import DistillConfig, OnPolicyBatches, load_prompts

    prompts, task, _ = load_prompts(DistillConfig(task="addition", prompts=5))
    tok, model = load_tokenizer(checkpoint), load_model(checkpoint).train()

    def source():
        s = OnPolicyBatches(prompts, tok, 3, Sampling(max_tokens=6), task=task, seed=7)
        s.model = model
        return s

    first = source()
    next(first)
    state = first.state_dict()
    expected = next(first)
    second = source()
    second.load_state_dict(state)
    again = next(second)
    assert torch.equal(again["input_ids"], expected["input_ids"]) and torch.equal(again["mask"], expected["mask"])
    assert model.training
    assert (expected["input_ids"][:, 0] == tok.bos_id).all()
    assert expected["mask"][:, 0].sum() == 0 and (expected["mask"].sum(1) >= 1).all()  # prompts are not scored


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.slow
def test_tokenizer_mismatch_is_a_one_line_error(checkpoint, tmp_path, capsys):
    other = make_checkpoint(tmp_path / "other", vocab_size=400)  # another tokenizer
    args = ["--teacher", str(checkpoint), "--student", str(other), "--task", "addition", "--steps", "1"]
    proc = subprocess.run([sys.executable, "-m", "daulat.cli", "distill", *args, "--mode", "fkl",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tokenizer" in lines[0] and "--mode sft" in lines[0] and "Traceback" not in proc.stderr
    assert main(["distill", *args, "--mode", "rkl", "--out", str(tmp_path / "y")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # bad input leaves nothing behind


@pytest.mark.parametrize("argv,words", [
    (["--teacher", "/no/such/ckpt", "--preset", "micro", "--task", "addition"], "neither a checkpoint"),
    (["--teacher", "http://127.0.0.1:9/v1", "--preset", "micro", "--task", "addition", "--mode", "fkl",
      "--teacher-model", "m"], "full next-token distribution"),
    (["--teacher", "T", "--task", "addition"], "give the student"),
    (["--teacher", "T", "--preset", "micro", "--task", "addition", "distill.mode=kd"], "distill"),
])
def test_bad_input_is_a_one_line_error(argv, words, tmp_path, capsys):
    assert main(["distill", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_api_base_accepts_what_users_type():
    assert api_base("http://h:8000") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/chat/completions") == "http://h:8000/v1"


# ------------------------------------------------------------------------------------------ an HTTP teacher


@pytest.mark.slow
def test_sft_from_a_daulat_serve_teacher_across_tokenizers(checkpoint, tmp_path):
    require("daulat.infer.server")
    student = make_checkpoint(tmp_path / "student", vocab_size=400, seed=1)  # its own tokenizer
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."}]}) + "\n"
                             for w in ("one", "two", "three", "four", "five")))
    with Server(checkpoint) as server:
        teacher = HTTPTeacher(server.url)  # asks /v1/models for the name
        assert teacher.model
        assert main(["distill", "--teacher", server.url + "/v1", "--student", str(student), "--data", str(chats),
                     "--mode", "sft", "--out", str(tmp_path / "run"), "--steps", "2", "train.batch_size=2",
                     "train.log_every=1", "train.eval_batches=0", "distill.samples_per_prompt=2",
                     "distill.keep_per_prompt=2", "distill.teacher_sampling.max_tokens=6", "distill.drop_truncated=false",
                     "distill.teacher_sampling.temperature=1.0"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "teacher_data.jsonl").read_text().splitlines()]
    assert 5 <= len(rows) <= 10 and all(r["passed_checker"] is None for r in rows)
    assert all(r["messages"][0]["content"].startswith("Say ") and r["messages"][-1]["role"] == "assistant" for r in rows)
    manifest = json.loads((tmp_path / "run" / "teacher_data.json").read_text())
    assert manifest["request"]["teacher"] == {"kind": "http", "url": server.url + "/v1", "model": teacher.model}
    info = json.loads((tmp_path / "run" / "final" / "daulat.json").read_text())
    assert info["teacher"]["kind"] == "http" and info["mode"] == "sft"
    assert info["history"][-1]["stage"] == "init"  # the student's own lineage


def test_teacher_answers_are_reused_from_a_copied_run_but_not_from_another_teacher():
    from daulat.train.teacher_data import _same_request

    teacher = {"kind": "checkpoint", "path": "runs/a/grpo/final", "weights_sha256": "ab" * 32, "parameters": 10}
    made = {"teacher": teacher, "sampling": {"temperature": 0.6, "n": 1}, "prompts": {"task": "addition"}}
    moved = {**made, "teacher": {**teacher, "path": "/elsewhere/a/grpo/final"}}
    assert _same_request(made, moved)
    assert not _same_request(made, {**moved, "teacher": {**moved["teacher"], "weights_sha256": "cd" * 32}})
    assert not _same_request(made, {**moved, "sampling": {"temperature": 1.0, "n": 1}})
    unhashed = {**made, "teacher": {**teacher, "weights_sha256": None}}  # too big to hash: the path is all we know
    assert not _same_request(unhashed, {**unhashed, "teacher": {**unhashed["teacher"], "path": "/elsewhere"}})
