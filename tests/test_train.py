"""The training loop and `daulat pretrain`: loss falls, the router bias moves, checkpoints hold what
they should, the schedule has its shape, and bad input is one line with exit code 2."""

import json
import math
import shutil

import pytest
import torch

from daulat.checkpoint import load_model, load_train_state
from daulat.cli import main
from daulat.config import load_config
from daulat.errors import DaulatError
from daulat.train.loop import TrainConfig, learning_rate, parameter_groups
from daulat.train.pretrain import pretrain, schema

STEPS, BATCH, SEQ = 60, 16, 64


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = load_config(schema(), preset="micro", overrides=[
            f"train.steps={STEPS}", f"train.batch_size={BATCH}", f"train.seq_len={SEQ}", "train.save_every=20",
            "train.keep_last=2", "train.log_every=5", "train.eval_every=30"])
        summary = pretrain(config, out, verbose=False)
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, summary, records


def test_loss_falls_clearly_on_micro(micro_run):
    out, summary, records = micro_run
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(5, STEPS + 1, 5))
    assert train[0]["loss"] > 5.0  # about ln(512) at the start
    assert train[-1]["loss"] < train[0]["loss"] - 2.0
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [30, 60] and val[-1]["val_loss"] < 3.5
    for r in train:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"} <= r.keys()
        assert r["tokens"] == r["step"] * BATCH * SEQ and r["tokens_per_s"] > 0
    assert summary["step"] == STEPS and summary["loss"] == train[-1]["loss"]


def test_router_bias_is_updated_and_expert_load_is_logged(micro_run):
    out, _, records = micro_run
    model = load_model(out / "final")
    gamma = TrainConfig().bias_update_speed
    for moe in model.moe_layers():
        bias = moe.gate.e_score_correction_bias
        assert bias.abs().sum() > 0  # moved away from its zero start
        assert bias.abs().max() <= STEPS * gamma + 1e-6  # by at most gamma per step
    n_moe = len(model.moe_layers())
    for r in (r for r in records if "loss" in r):
        assert len(r["expert_load_max_over_mean"]) == n_moe and all(x >= 1.0 for x in r["expert_load_max_over_mean"])
        assert all(abs(sum(share) - 1) < 1e-3 for share in r["expert_load"])


def test_checkpoints_hold_the_model_the_state_and_the_provenance(micro_run):
    out, _, _ = micro_run
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000040", "step-000060"]  # keep_last = 2
    assert not (out / "final" / "train_state").exists()
    state = load_train_state(out / "step-000060")
    meta, tensors = state["meta"], state["tensors"]
    assert meta["step"] == STEPS and meta["tokens"] == STEPS * BATCH * SEQ
    assert meta["batches"]["position"] == STEPS * BATCH
    assert tensors["rng.torch.rank0"].dtype == torch.uint8
    model = load_model(out / "final")
    names = [n for n, _ in model.named_parameters()]
    assert all(f"optimizer.{n}.exp_avg" in tensors and f"optimizer.{n}.exp_avg_sq" in tensors for n in names)

    info = json.loads((out / "final" / "daulat.json").read_text())
    assert info["stage"] == "pretrain" and info["step"] == STEPS
    assert info["config"]["model"]["vocab_size"] == model.config.vocab_size
    assert info["config"]["train"]["steps"] == STEPS
    assert info["data"]["manifest"]["builtin"] and info["data"]["train_tokens"] > 0
    compute = info["compute"]
    assert info["tokens"] == compute["tokens"] == STEPS * BATCH * SEQ and compute["wall_time_s"] > 0
    n_active = model.num_parameters(active=True) - model.embed_tokens.weight.numel()
    assert compute["flops_6nd"] == 6 * n_active * info["tokens"] and compute["flops"] > compute["flops_6nd"]
    assert compute["parameters_total"] == model.num_parameters() and compute["energy"]["kwh"] > 0
    assert compute["hardware"]["world_size"] == 1 and compute["hardware"]["device_type"] == "cpu"
    assert info["metrics"]["train_loss"] > 0 and info["metrics"]["val_loss"] > 0
    from daulat.report import annex_xi, missing_fields

    assert missing_fields(annex_xi(model, info)) == []  # the model card has everything it needs
    assert (out / "final" / "tokenizer.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "data" / "index.json").is_file()


def test_schedules_warm_up_then_decay_to_the_floor():
    cosine = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [learning_rate(cosine, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 46 / 90)))
    wsd = TrainConfig(steps=100, lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    lrs = [learning_rate(wsd, s) for s in range(100)]
    assert all(lr == 1.0 for lr in lrs[9:80]) and lrs[80] < 1.0 and lrs[-1] == pytest.approx(0.0)
    constant = TrainConfig(steps=100, lr=1.0, warmup_steps=0, schedule="constant")
    assert {learning_rate(constant, s) for s in range(100)} == {1.0}


def test_weight_decay_skips_norms_biases_and_embeddings():
    from daulat.model import DeepseekV3, ModelConfig

    model = DeepseekV3(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                   num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                                   qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                   attention_bias=True))
    decay, no_decay = parameter_groups(model, 0.1)
    name = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and "embed_tokens" not in name[id(p)] for p in decay["params"])
    skipped = {name[id(p)] for p in no_decay["params"]}
    assert "embed_tokens.weight" in skipped and "norm.weight" in skipped
    assert any(n.endswith(".bias") for n in skipped) and "lm_head.weight" not in skipped
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_print_config_shows_the_merged_toml_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    # an override written after --data PATH... is still an override
    assert main(["pretrain", "--out", str(out), "--preset", "micro", "--print-config", "--steps", "7",
                 "--data", str(tmp_path / "docs"), "train.lr=0.01"]) == 0
    text = capsys.readouterr().out
    assert "[model]" in text and "[train]" in text and "[data]" in text
    assert "steps = 7" in text and "lr = 0.01" in text
    assert not out.exists()


@pytest.mark.parametrize("args,words", [
    (["train.nonsense=1"], "unknown key train.nonsense"),
    (["train.schedule=linear"], "schedule"),
    (["train.steps=0"], "steps"),
    (["train.batch_size=10", "train.grad_accum=4"], "grad_accum"),
    (["nosection.key=1"], "unknown section"),
    (["train.seq_len=4096"], "max_position_embeddings"),
    (["--data", "/no/such/file.txt"], "data path not found: /no/such/file.txt"),
    (["--tokenizer", "/no/such/tokenizer"], "tokenizer not found"),
    (["--config", "{tmp}/bad.toml"], "malformed TOML"),
    (["--config", "{tmp}/unknown.toml"], "unknown key data.colour"),
])
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(args, words, tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[train\nsteps = 3\n")
    (tmp_path / "unknown.toml").write_text("[data]\ncolour = 'blue'\n")
    out = tmp_path / "out"
    argv = ["pretrain", "--preset", "micro", "--out", str(out), *[a.format(tmp=tmp_path) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["pretrain", "--preset", "micro", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create output directory" in err[0]
    assert main(["pretrain", "--preset", "micro", "--out", str(blocker)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_checkpoints_are_never_overwritten_and_a_corrupt_one_is_named(micro_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(micro_run[0], out)
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["pretrain", "--preset", "micro", "--out", str(out)]) == 2  # no --resume
    assert "pass --resume" in capsys.readouterr().err

    state = out / "step-000060" / "train_state" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    assert main(["pretrain", "--preset", "micro", "--out", str(out), "--resume", f"train.steps={STEPS}",
                 f"train.batch_size={BATCH}", f"train.seq_len={SEQ}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(state) in err[0]

    (out / "step-000060" / "config.json").write_text("{")
    assert main(["pretrain", "--preset", "micro", "--out", str(out), "--resume"]) == 2
    assert "step-000060/config.json" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing added, nothing removed


class _BindingSource:
    """Random token batches; records what the Trainer hands it through bind()."""

    def __init__(self, vocab: int):
        self.vocab_size, self.bound, self.batches_before_bind, self.batches = vocab, [], None, 0

    def bind(self, trainer):
        self.bound.append({"model": trainer.model, "optimizer": hasattr(trainer, "optimizer"), "step": trainer.step,
                           "device": trainer.device, "dist": trainer.dist, "autocast": trainer.autocast()})
        self.batches_before_bind = self.batches
        trainer.log({"bound": True})

    def __iter__(self):
        return self

    def __next__(self):
        self.batches += 1
        ids = torch.randint(0, self.vocab_size, (4, 17))
        return ids[:, :-1], ids[:, 1:]


def test_trainer_seam_bind_evaluate_and_log(tmp_path):
    from daulat.model import DeepseekV3, ModelConfig
    from daulat.train.loop import Trainer

    torch.manual_seed(0)
    model = DeepseekV3(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                   num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                                   qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2))
    config = TrainConfig(steps=4, batch_size=4, seq_len=16, warmup_steps=0, log_every=1, eval_every=2, device="cpu",
                         threads=1)
    source = _BindingSource(64)
    seen = []

    def evaluate(m):
        seen.append({"same_model": m is model, "training": m.training, "grad": torch.is_grad_enabled()})
        return {"held_out_accuracy": 0.25 * len(seen), "answers": len(seen)}

    threads = torch.get_num_threads()
    try:
        trainer = Trainer(model, config, lambda m, batch: m.training_loss(*batch), source, tmp_path / "run",
                          evaluate=evaluate)
        assert torch.get_num_threads() == 1  # train.threads is applied when the Trainer starts
        trainer.fit()
    finally:
        torch.set_num_threads(threads)

    assert len(source.bound) == 1 and source.batches_before_bind == 0  # once, before the first batch
    bound = source.bound[0]
    assert bound["model"] is trainer.model and bound["optimizer"] and bound["step"] == 0
    assert bound["device"] == trainer.device and bound["dist"] is trainer.dist
    with bound["autocast"]:  # a context manager (float32 on CPU: no autocast)
        pass
    assert seen == [{"same_model": True, "training": False, "grad": False}] * 2  # eval mode, no grad, main rank
    assert trainer.model.training  # back in training mode afterwards

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 0, "bound": True}  # trainer.log writes through the Trainer's writer
    validation = [r for r in records if "held_out_accuracy" in r]
    assert [(r["step"], r["held_out_accuracy"], r["answers"]) for r in validation] == [(2, 0.25, 1), (4, 0.5, 2)]
    assert all("val_loss" not in r and "loss" not in r and r["tokens"] > 0 for r in validation)  # no val_batches
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_evaluate_merges_into_the_validation_loss_line(tmp_path):
    from daulat.model import DeepseekV3, ModelConfig
    from daulat.train.loop import Trainer

    torch.manual_seed(0)
    model = DeepseekV3(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                                   qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=1))
    config = TrainConfig(steps=2, batch_size=4, seq_len=16, warmup_steps=0, log_every=1, eval_every=0,
                         eval_batches=1, device="cpu", optimizer="muon", log_max_logit=True)
    val = torch.randint(0, 64, (4, 17))
    trainer = Trainer(model, config, lambda m, batch: m.training_loss(*batch), _BindingSource(64), tmp_path / "run",
                      val_batches=lambda: [(val[:, :-1], val[:, 1:])], evaluate=lambda m: {"exact_match": 0.5})
    trainer.fit()
    trainer.log({"note": "after fit"})  # outside fit() the line is appended too
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "val_loss" in r]
    assert len(last) == 1 and last[0]["step"] == 2 and last[0]["exact_match"] == 0.5 and last[0]["val_loss"] > 0
    assert all(r["max_logit"] > 0 for r in records if "loss" in r)  # logged per step when asked
    assert records[-1] == {"step": 2, "note": "after fit"}


def test_the_router_bias_speed_lives_in_train_and_older_checkpoints_still_load(tmp_path):
    """train.bias_update_speed is the one home of gamma; a config.json written when it was also a
    model field (`bias_update_speed` there) still loads, the old key ignored."""
    from daulat.checkpoint import load_checkpoint, save_model
    from daulat.model import DeepseekV3, ModelConfig

    assert "bias_update_speed" not in {f for f in ModelConfig.__dataclass_fields__}
    assert TrainConfig().bias_update_speed == 1e-3
    config = load_config({"model": ModelConfig}, preset="micro")["model"]
    save_model(DeepseekV3(config), tmp_path / "old")
    written = json.loads((tmp_path / "old" / "config.json").read_text())
    assert "bias_update_speed" not in written
    (tmp_path / "old" / "config.json").write_text(json.dumps({**written, "bias_update_speed": 0.01}))
    assert load_checkpoint(tmp_path / "old").model.config == config
    with pytest.raises(DaulatError, match="model.bias_update_speed is now train.bias_update_speed"):
        load_config({"model": ModelConfig}, preset="micro", overrides=["model.bias_update_speed=0.01"])
