"""A config's [model] table picks the architecture (`model_type`), presets inherit from a base, and
every stage that builds a fresh model builds the one named."""

import json

import pytest

from daulat import config as config_module
from daulat.architectures import MODEL_TYPES, ModelSection, build_model
from daulat.config import load_config, read_preset, to_dict, to_toml
from daulat.errors import DaulatError
from daulat.model import ModelConfig
from daulat.model_v4 import DeepseekV4, ModelConfigV4
from daulat.model_v32 import DeepseekV32, DeepseekV32Config


@pytest.mark.parametrize("preset, cls", [("tiny", ModelConfig), ("tiny-v32", DeepseekV32Config),
                                         ("tiny-v4", ModelConfigV4), ("small-gpu-v4", ModelConfigV4)])
def test_a_preset_names_its_architecture_and_the_printed_config_reads_back_the_same(preset, cls):
    config = load_config({"model": ModelSection}, preset=preset)
    assert type(config["model"]) is cls
    printed = to_dict(config)["model"]
    assert printed["model_type"] == cls.model_type
    again = load_config({"model": ModelSection}, base=config_module.tomllib.loads(to_toml(config)))
    assert again["model"] == config["model"]


def test_an_architecture_preset_inherits_the_base_tables_it_does_not_write():
    tiny, v4 = read_preset("tiny"), read_preset("tiny-v4")
    assert v4["train"] == tiny["train"] and v4["data"] == tiny["data"] and v4["grpo"] == tiny["grpo"]
    gpu, gpu_v4 = read_preset("small-gpu"), read_preset("small-gpu-v4")
    assert gpu_v4["train"] == gpu["train"] and gpu_v4["model"]["model_type"] == "deepseek_v4"
    assert v4["speedrun"]["grpo_steps"] < tiny["speedrun"]["grpo_steps"]  # its own table, whole
    assert "intermediate_size" in tiny["model"] and "intermediate_size" not in v4["model"]  # replaced whole
    assert "base" not in v4


def test_fresh_models_are_of_the_named_architecture():
    small = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    v32 = DeepseekV32Config(**small, intermediate_size=64, moe_intermediate_size=16, kv_lora_rank=16,
                            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, q_lora_rank=16,
                            index_n_heads=2, index_head_dim=16, index_topk=4)
    assert type(build_model(v32)) is DeepseekV32
    assert type(build_model(ModelConfigV4())) is DeepseekV4
    assert set(MODEL_TYPES) == {"deepseek_v3", "deepseek_v32", "deepseek_v4"}


@pytest.mark.parametrize("override, words", [
    ('model.model_type="gpt2"', "model.model_type = 'gpt2': expected one of deepseek_v3, deepseek_v32"),
    ('model.intermediate_size=64', "unknown key model.intermediate_size"),  # not a V4 field
])
def test_a_wrong_model_table_is_one_line_naming_it(override, words):
    preset = "tiny" if "gpt2" in override else "tiny-v4"
    with pytest.raises(DaulatError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        load_config({"model": ModelSection}, preset=preset, overrides=[override])
    assert "\n" not in str(e.value)


def test_a_preset_base_cycle_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "RECIPES", tmp_path)
    (tmp_path / "a.toml").write_text('base = "b"\n[train]\nsteps = 1\n')
    (tmp_path / "b.toml").write_text('base = "a"\n')
    with pytest.raises(DaulatError, match="base = 'a' must name another preset, without a cycle"):
        read_preset("a")
    (tmp_path / "c.toml").write_text('base = "nothing"\n')
    with pytest.raises(DaulatError, match="unknown preset 'nothing'"):
        read_preset("c")


def test_pretraining_builds_and_saves_the_named_architecture(tmp_path):
    from daulat.checkpoint import load_checkpoint
    from daulat.cli import main

    out = tmp_path / "v32"
    code = main(["pretrain", "--preset", "micro", "--out", str(out), "--steps", "2", "--threads", "1",
                 'model.model_type="deepseek_v32"', "model.q_lora_rank=16", "model.index_topk=8",
                 "model.index_n_heads=2", "model.index_head_dim=16", "data.builtin_docs=200"])
    assert code == 0
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "deepseek_v32"
    assert json.loads((out / "final" / "daulat.json").read_text())["config"]["model"]["model_type"] == "deepseek_v32"
    assert type(load_checkpoint(out / "final").model) is DeepseekV32


@pytest.mark.parametrize("warmup", [1, 0])
def test_the_v32_indexer_trains_in_pretraining_alone_during_its_warm_up(tmp_path, warmup):
    import torch

    from daulat.checkpoint import load_checkpoint
    from daulat.cli import main

    out = tmp_path / "v32"
    assert main(["pretrain", "--preset", "micro", "--out", str(out), "--steps", "1", "--threads", "1",
                 'model.model_type="deepseek_v32"', "model.q_lora_rank=16", "model.index_topk=8",
                 "model.index_n_heads=2", "model.index_head_dim=16", "data.builtin_docs=200",
                 f"train.indexer_warmup_steps={warmup}", "train.warmup_steps=0"]) == 0
    trained = load_checkpoint(out / "final").model
    torch.manual_seed(0)  # the run's seed: the weights it started from
    start = build_model(trained.config).state_dict()
    moved = {name for name, t in trained.state_dict().items() if not torch.equal(t, start[name])}
    indexer = {name for name in moved if ".indexer." in name}
    assert indexer  # the indexer learns in both modes
    if warmup:
        assert moved == indexer  # the warm-up step trains the indexer only, with dense attention
    else:
        assert "embed_tokens.weight" in moved and moved - indexer  # sparse training moves the model too


def test_the_indexer_is_left_alone_where_it_cannot_learn(monkeypatch):
    """Under torchrun the warm-up is refused in one line; a frozen indexer (LoRA) is never switched on."""
    import torch

    from daulat.lora import LoraConfig, apply_lora
    from daulat.train.optim import TrainConfig, indexer_is_trainable

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="indexer_warmup_steps.*one process"):
        TrainConfig(indexer_warmup_steps=10)
    monkeypatch.setenv("WORLD_SIZE", "1")
    torch.manual_seed(0)
    model = build_model(DeepseekV32Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                          num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
                                          qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, q_lora_rank=16,
                                          index_n_heads=2, index_head_dim=16, index_topk=4))
    assert indexer_is_trainable(model)
    apply_lora(model, LoraConfig(rank=4))
    assert not indexer_is_trainable(model)
