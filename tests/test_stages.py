"""The stage skeleton and its seams: every stage's record, the stage-config entry point (flags as
overrides, nested sampling tables), the one sampling type, the table of distillation modes, and the
resumable epoch cursor."""

import json
import tomllib

import pytest
import torch

from daulat.config import to_toml
from daulat.errors import DaulatError
from daulat.generation import SampleRequest, Sampling

# ------------------------------------------------------------------------------------------ records


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """pretrain -> sft -> grpo -> distill (fkl, a fresh student), each a step or two on the micro preset."""
    from daulat import cli

    d = tmp_path_factory.mktemp("lineage")
    steps = ["--preset", "micro", "--steps", "1", "train.log_every=1"]
    assert cli.main(["pretrain", "--out", str(d / "pretrain"), *steps, "data.builtin_docs=300", "model.vocab_size=300",
                     "train.batch_size=4", "train.eval_batches=1"]) == 0
    assert cli.main(["sft", "--init", str(d / "pretrain" / "final"), "--task", "addition", "--out", str(d / "sft"), *steps,
                     "sft.task_examples=16", "train.batch_size=4", "train.seq_len=64", "sft.val_fraction=0.25",
                     "train.eval_batches=1"]) == 0
    assert cli.main(["grpo", "--init", str(d / "sft" / "final"), "--task", "addition", "--out", str(d / "grpo"), *steps,
                     "grpo.prompts_per_rollout=2", "grpo.group_size=2", "train.batch_size=4", "grpo.sampling.max_tokens=4",
                     "grpo.eval_problems=2"]) == 0
    assert cli.main(["distill", "--teacher", str(d / "grpo" / "final"), "--task", "addition", "--mode", "fkl",
                     "--out", str(d / "distill"), *steps, "distill.prompts=4", "distill.teacher_sampling.max_tokens=4",
                     "distill.filter=false", "distill.drop_truncated=false", "train.batch_size=2", "train.seq_len=64",
                     "train.eval_batches=0"]) == 0
    return d


@pytest.mark.slow
def test_every_stage_record_has_created_environment_and_its_lineage(lineage):
    from daulat.checkpoint import load_info

    expected_history = {"pretrain": [], "sft": ["pretrain"], "grpo": ["pretrain", "sft"],
                        "distill": ["pretrain", "sft", "grpo"]}  # a fresh student inherits its teacher's lineage
    for stage, history in expected_history.items():
        info = load_info(lineage / stage / "final")
        assert info["stage"] == stage and info["method"]
        assert info["created"].startswith("20") and info["environment"]["python"] and info["environment"]["torch"]
        assert [h["stage"] for h in info["history"]] == history, stage
        assert all(h.get("created") and h.get("environment") for h in info["history"]), stage
        assert info["parameters"] > 0 and info["tokenizer_sha256"] and "hardware" in info["compute"]
        assert info["config"]["train"]["steps"] == 1
    assert load_info(lineage / "sft" / "final")["init"] == str(lineage / "pretrain" / "final")
    sampling = load_info(lineage / "grpo" / "final")["config"]["grpo"]["sampling"]
    assert sampling == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_tokens": 4}


@pytest.mark.slow
def test_the_card_of_every_stage_shows_its_release_date_and_hardware(lineage, capsys):
    from daulat import cli

    for stage in ("sft", "grpo"):
        capsys.readouterr()
        assert cli.main(["card", str(lineage / stage / "final"), "--json"]) == 0
        card = json.dumps(json.loads(capsys.readouterr().out))
        info = json.loads((lineage / stage / "final" / "daulat.json").read_text())
        assert info["created"][:10] in card and info["environment"]["cpu"] in card, stage


@pytest.mark.slow
def test_grpo_evaluates_held_out_through_the_trainer(lineage):
    records = [json.loads(line) for line in (lineage / "grpo" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evaluations] == [0, 1] and all(r["eval_problems"] == 2 for r in evaluations)


# ------------------------------------------------------------------------------------------ config entry point


def test_flags_become_overrides_before_validation():
    from daulat.cli import build_parser
    from daulat.train import sft
    from daulat.train.common import FLAG, flag_overrides

    args = build_parser("sft").parse_args(["sft", "--init", "x", "--out", "y", "--data", "chats.jsonl", "--steps", "7",
                                           'sft.task="addition"'])
    flags = {"data": {"sft.data": FLAG, "sft.task": None}, "task": {"sft.task": FLAG, "sft.data": None}}
    overrides = [*args.overrides, *flag_overrides(args, flags)]
    assert overrides[1:] == [("train.steps", 7), ("sft.data", "chats.jsonl"), ("sft.task", None)]
    config = sft.STAGE.config(preset="micro", overrides=overrides)  # the flag wins over the override
    assert config["sft"].data == "chats.jsonl" and config["sft"].task is None and config["train"].steps == 7
    # the recipe's [sft.train] over the stage's defaults, and the machine keys of its [train]
    assert config["train"].seq_len == 192 and config["train"].weight_decay == 0.0


def test_nested_sampling_tables_validate_and_round_trip(tmp_path):
    from daulat.train import distill, grpo

    config = grpo.STAGE.config(preset="micro", overrides=["grpo.sampling.temperature=0.7", ("grpo.sampling.top_k", 5)])
    assert config["grpo"].sampling == Sampling(temperature=0.7, top_p=1.0, top_k=5, max_tokens=96)
    text = to_toml(config)
    assert "[grpo.sampling]" in text and tomllib.loads(text)["grpo"]["sampling"]["top_k"] == 5
    (tmp_path / "again.toml").write_text(text)
    assert grpo.STAGE.config(path=tmp_path / "again.toml") == config
    for bad, words in (("grpo.sampling.top_p=1.5", "top_p"), ("grpo.sampling.temperature=0", "temperature"),
                       ("grpo.sampling.beam=2", "grpo.sampling.beam"), ("grpo.sampling=3", "grpo.sampling")):
        with pytest.raises(DaulatError, match=words):
            grpo.STAGE.config(preset="micro", overrides=[bad])
    d = distill.STAGE.config(preset="micro")["distill"]
    assert d.teacher_sampling == Sampling(temperature=0.6, top_p=0.95, max_tokens=96)
    assert d.student_sampling == Sampling(max_tokens=96)


def test_sampling_becomes_the_engines_params_in_one_place():
    from daulat.infer import SamplingParams

    s = Sampling(temperature=0.7, top_p=0.9, top_k=5, max_tokens=12)
    assert s.params(n=3, seed=4) == SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=5, max_tokens=12, seed=4)
    assert s.params(max_tokens=2).max_tokens == 2 and s.params().n == 1
    assert SampleRequest(s, n=2, seed=9).to_dict() == {"n": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
                                                       "max_tokens": 12, "seed": 9}


# ------------------------------------------------------------------------------------------ distillation modes


def test_the_table_of_modes():
    from daulat.train.distill import MODES, DistillConfig, ForwardKLObjective, ReverseKLObjective
    from daulat.train.objectives import sft_objective

    assert list(MODES) == ["sft", "fkl", "rkl"]
    given = DistillConfig(sequences="given")
    assert [MODES[m].sequences(given) for m in MODES] == ["teacher", "given", "student"]
    assert [MODES[m].sequences(DistillConfig()) for m in MODES] == ["teacher", "teacher", "student"]
    assert [MODES[m].needs_logits for m in MODES] == [False, True, True]
    cfg = DistillConfig(kl_temperature=2.0, ce_weight=0.5, rkl_estimator="sampled")
    assert MODES["sft"].objective(None, 10, cfg) is sft_objective
    fkl, rkl = MODES["fkl"].objective("T", 10, cfg), MODES["rkl"].objective("T", 10, cfg)
    assert isinstance(fkl, ForwardKLObjective) and (fkl.temperature, fkl.ce_weight) == (2.0, 0.5)
    assert isinstance(rkl, ReverseKLObjective) and rkl.estimator == "sampled"
    with pytest.raises(ValueError, match="mode"):
        DistillConfig(mode="kd")


def test_on_policy_distillation_trains_with_the_tested_reverse_kl(monkeypatch):
    """ReverseKLObjective's loss is `reverse_kl` itself: replacing it changes the loss."""
    from daulat.train import distill_losses
    from daulat.train.distill_losses import ReverseKLObjective, reverse_kl

    class Fixed(torch.nn.Module):  # a "model" whose logits are given
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.nn.Parameter(logits)

        def forward(self, ids):
            return self.logits[: ids.shape[1]][None].expand(ids.shape[0], -1, -1)

        def moe_layers(self):
            return []

    torch.manual_seed(0)
    student, teacher = Fixed(torch.randn(6, 11)), Fixed(torch.randn(6, 11))
    batch = {"input_ids": torch.randint(0, 11, (2, 7)), "mask": torch.tensor([[0, 0, 1, 1, 1, 1]] * 2)}
    objective = ReverseKLObjective(type("T", (), {"logits": lambda self, ids: teacher(ids)})(), 11)
    loss, stats = objective(student, batch)
    expected = reverse_kl(student.logits[2:6], teacher.logits[2:6]).mean()
    assert torch.allclose(loss, expected) and torch.allclose(stats["rkl"], expected)
    monkeypatch.setattr(distill_losses, "reverse_kl", lambda s, t: torch.zeros(s.shape[0]))
    assert objective(student, batch)[0].item() == 0.0


# ------------------------------------------------------------------------------------------ the epoch cursor


def test_the_epoch_cursor_resumes_exactly_and_refuses_other_data():
    from daulat.data.conversations import EpochCursor

    a = EpochCursor(5, seed=3, what="prompts")
    first = a.take(7)  # crosses into the second epoch
    assert sorted(i for i, _ in first[:5]) == list(range(5)) and len({d for _, d in first}) == 7
    b = EpochCursor(5, seed=3, what="prompts")
    b.load_state_dict(a.state_dict())
    assert a.take(6) == b.take(6)
    with pytest.raises(DaulatError, match="saved over 5 prompts, now there are 4"):
        EpochCursor(4, what="prompts").load_state_dict(a.state_dict())
    with pytest.raises(DaulatError, match="no prompts"):
        EpochCursor(0, what="prompts")
