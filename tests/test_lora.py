"""LoRA adapters: PEFT reads daulat's adapter directories with daulat's logits, training through the
Trainer moves only the adapters, merging and switching off are exact, the base's files are never
written, and bad input is a one-line DaulatError."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import require
import torch

import daulat
from daulat import lora
from daulat.checkpoint import load_checkpoint, load_model, load_train_state, save_model
from daulat.config import load_config
from daulat.errors import DaulatError
from daulat.lora import LoraConfig
from daulat.train.optim import TrainConfig, router_bias_speed
from daulat.model import DeepseekV3, ModelConfig
from daulat.train.loop import Trainer, TrainConfig

BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            max_position_embeddings=256)
VARIANTS = {"plain": {}, "q_lora_bias": {"q_lora_rank": 32, "attention_bias": True}}


def make_base(path: Path, **overrides) -> Path:
    torch.manual_seed(0)
    model = DeepseekV3(ModelConfig(**{**BASE, **overrides}))
    with torch.no_grad():  # a trained-looking router bias, so that a wrong one would show
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    save_model(model, path)
    return path


def file_hashes(path: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.is_file()}


def randomise_adapters(model, seed=1):
    """Non-zero B (a fresh adapter is the identity), so that comparisons mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.adapter_units(model).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.2)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.2)


def adapted(base: Path, **config):
    model = load_model(base)
    lora.prepare(model, LoraConfig(**{"rank": 4, "alpha": 8.0, **config}), base)
    randomise_adapters(model)
    return model.eval()


def tokens(batch=2, length=11, seed=0):
    return torch.randint(0, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "base")


# ------------------------------------------------------------------------------------------------
# PEFT reads what daulat writes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_loads_the_adapter_onto_transformers_with_daulats_logits(variant, tmp_path):
    transformers = require("transformers")
    peft = require("peft")
    base = make_base(tmp_path / "base", **VARIANTS[variant])
    before = file_hashes(base)
    model = adapted(base)
    lora.save_adapter(model, tmp_path / "adapter", info={"stage": "sft"})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == str(base.resolve())

    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(wrapped) == len(lora.lora_layers(model))  # the same layers, no more
    ids = tokens()
    with torch.no_grad():
        ours, theirs = model(ids), peft_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    with torch.no_grad(), lora.adapters_disabled(model):
        plain = model(ids)
    assert (plain - ours).abs().max().item() > 1e-2  # the adapter really changes the output
    assert file_hashes(base) == before


def test_adapter_files_carry_peft_names_and_daulats_record(base_dir, tmp_path):
    model = adapted(base_dir)
    daulat.save_model(model, tmp_path / "adapter", info={"stage": "sft", "method": "LoRA SFT"})  # with its card
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in names  # dense MLP
    assert "base_model.model.model.layers.1.mlp.shared_experts.gate_proj.lora_A.weight" in names
    assert not any("experts." in n and "shared" not in n for n in names)  # routed experts stay frozen
    assert len(names) == 2 * len(lora.lora_layers(model))
    info = json.loads((tmp_path / "adapter" / "daulat.json").read_text())
    assert info["stage"] == "sft" and info["lora"]["base_architecture"]["hidden_size"] == BASE["hidden_size"]
    assert (tmp_path / "adapter" / "README.md").is_file()
    assert not list(tmp_path.glob(".adapter.tmp-*"))


def test_load_adapter_resolves_the_base_and_gives_the_same_logits(base_dir, tmp_path):
    before = file_hashes(base_dir)
    model = adapted(base_dir)
    lora.save_adapter(model, tmp_path / "adapter")
    loaded, tokenizer, info = load_checkpoint(tmp_path / "adapter", merge_adapter=False)
    merged = load_checkpoint(tmp_path / "adapter").model
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        assert (merged(ids) - model(ids)).abs().max().item() <= 1e-5
    assert not lora.lora_layers(merged) and lora.is_adapter_dir(tmp_path / "adapter")
    assert info["lora"]["base"] == str(base_dir.resolve())
    # a relative base_model_name_or_path is read from the adapter directory
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, base_model_name_or_path=os.path.relpath(base_dir, tmp_path / "adapter"))))
    assert lora.resolve_base(tmp_path / "adapter").resolve() == base_dir.resolve()
    assert torch.equal(load_checkpoint(tmp_path / "adapter", merge_adapter=False).model(ids), loaded(ids))
    assert file_hashes(base_dir) == before


# ------------------------------------------------------------------------------------------------
# In memory: freezing, switching off, merging, accounting
# ------------------------------------------------------------------------------------------------


def test_fresh_adapters_leave_the_model_unchanged_and_only_they_train(base_dir):
    reference = load_model(base_dir)
    model = load_model(base_dir)
    record = lora.prepare(model, LoraConfig(rank=8), base_dir)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layers = lora.lora_layers(model)
    leaves = {n.rsplit(".", 1)[-1] for n in layers}
    assert leaves == {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any(".shared_experts." in n for n in layers) and not any(n.startswith("mtp.") for n in layers)
    counts = lora.parameter_counts(model)
    assert record["parameters_trainable"] == counts["parameters_trainable"] == sum(
        m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in layers.values())
    assert counts["parameters_total"] == reference.num_parameters() + counts["parameters_trainable"]
    assert record["alpha"] is None and layers["layers.0.self_attn.q_proj"].scaling == 2.0  # alpha = 2 * rank
    assert router_bias_speed(model, TrainConfig()) == 0.0  # the router bias is part of the frozen base


def test_adapters_disabled_is_the_base_exactly_and_merge_matches_unmerged(base_dir):
    reference = load_model(base_dir)
    model = adapted(base_dir, targets=["q_proj", "shared_experts.down_proj"])
    assert set(lora.lora_layers(model)) == {"layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj",
                                           "layers.2.self_attn.q_proj", "layers.1.mlp.shared_experts.down_proj",
                                           "layers.2.mlp.shared_experts.down_proj"}
    ids = tokens()
    with torch.no_grad():
        with lora.adapters_disabled(model):
            assert torch.equal(model(ids), reference(ids))
        unmerged = model(ids)
        assert not torch.equal(unmerged, reference(ids))
        lora.merge_lora(model)
        assert (model(ids) - unmerged).abs().max().item() <= 1e-5
    assert not lora.is_lora(model) and not lora.lora_layers(model)
    assert router_bias_speed(model, TrainConfig()) == TrainConfig().bias_update_speed


def test_merged_model_saves_as_an_ordinary_checkpoint(base_dir, tmp_path):
    model = adapted(base_dir)
    ids = tokens()
    with torch.no_grad():
        expected = model(ids)
    save_model(lora.merge_lora(model), tmp_path / "merged")
    with torch.no_grad():
        assert (load_model(tmp_path / "merged")(ids) - expected).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------
# Training through daulat's Trainer
# ------------------------------------------------------------------------------------------------


class Batches:
    """Deterministic (inputs, targets) micro-batches by position, resumable."""

    def __init__(self, batch=4, length=16):
        self.position, self.batch, self.length = 0, batch, length

    def __iter__(self):
        return self

    def __next__(self):
        ids = tokens(self.batch, self.length + 1, seed=self.position)
        self.position += 1
        return ids[:, :-1], ids[:, 1:]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def objective(model, batch):
    return model.training_loss(*batch)


def train(base: Path, out: Path, steps: int, resume_from=None, save_every=0):
    torch.manual_seed(0)
    model = load_model(base)
    lora.prepare(model, LoraConfig(rank=4, dropout=0.1), base)
    config = TrainConfig(steps=steps, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=1, log_every=1,
                         eval_every=0, eval_batches=0, save_every=save_every, keep_last=0, device="cpu", seed=3)
    trainer = Trainer(model, config, objective, Batches(), out, resume_from=resume_from)
    trainer.fit()
    return model


def test_trainer_moves_only_the_adapters_and_keeps_their_optimizer_state_only(base_dir, tmp_path):
    before = file_hashes(base_dir)
    reference = load_model(base_dir).state_dict()
    model = train(base_dir, tmp_path / "run", steps=3, save_every=3)
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        assert torch.equal(tensor, reference[name]), name  # weights and the router's correction bias
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in lora.lora_layers(model).values())
    state = load_train_state(tmp_path / "run" / "step-000003")["tensors"]
    optimizer = {k for k in state if k.startswith("optimizer.")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {k.split(".", 1)[1].rsplit(".", 1)[0] for k in optimizer} == trainable
    assert file_hashes(base_dir) == before


def test_a_resumed_lora_run_ends_bitwise_where_an_uninterrupted_one_does(base_dir, tmp_path):
    whole = train(base_dir, tmp_path / "whole", steps=4)
    train(base_dir, tmp_path / "cut", steps=4, save_every=2)
    resumed = train(base_dir, tmp_path / "cut", steps=4, resume_from=tmp_path / "cut" / "step-000002")
    assert lora.is_adapter_dir(tmp_path / "cut" / "final") and lora.is_adapter_dir(tmp_path / "cut" / "step-000002")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------
# Bad input: one line, naming the field or file
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, words", [
    ("lora.rank=0", "lora.rank"), ("lora.rank=-2", "lora.rank"), ("lora.alpha=0", "lora.alpha"),
    ("lora.dropout=1.5", "lora.dropout"), ("lora.targets=[]", "lora.targets"),
])
def test_bad_lora_config_is_one_line_naming_the_field(override, words):
    with pytest.raises(DaulatError, match=words.replace(".", r"\.")) as e:
        load_config({"lora": LoraConfig}, overrides=["lora.rank=4", override])
    assert "\n" not in str(e.value)


def test_a_target_that_matches_nothing_is_named(base_dir):
    model = load_model(base_dir)
    with pytest.raises(DaulatError, match=r"lora\.targets: 'q_a_proj' matches no linear layer"):
        lora.apply_lora(model, LoraConfig(rank=4, targets=["q_proj", "q_a_proj"]))
    with pytest.raises(DaulatError, match="'lm_head' matches no linear layer"):
        lora.apply_lora(model, LoraConfig(rank=4, targets=["lm_head"]))
    assert all(p.requires_grad for p in model.parameters()) and not lora.lora_layers(model)  # untouched


def test_missing_base_or_other_architecture_is_one_line_naming_the_file(base_dir, tmp_path):
    lora.save_adapter(adapted(base_dir), tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())

    config_file.write_text(json.dumps(dict(config, base_model_name_or_path=str(tmp_path / "nowhere"))))
    with pytest.raises(DaulatError, match=r"adapter_config\.json: base_model_name_or_path .*nowhere.*no checkpoint"):
        load_checkpoint(tmp_path / "adapter", merge_adapter=False)

    other = make_base(tmp_path / "other", hidden_size=48)
    config_file.write_text(json.dumps(dict(config, base_model_name_or_path=str(other))))
    with pytest.raises(DaulatError, match=r"other/config\.json: hidden_size = 48, but the adapter .* hidden_size = 64"):
        load_checkpoint(tmp_path / "adapter", merge_adapter=False)
    (tmp_path / "adapter" / "daulat.json").unlink()  # an adapter written elsewhere: its shapes decide
    with pytest.raises(DaulatError, match=r"adapter_model\.safetensors: tensor .* has shape"):
        load_checkpoint(tmp_path / "adapter", merge_adapter=False)

    config_file.write_text(json.dumps(dict(config, r=0)))
    with pytest.raises(DaulatError, match=r"adapter_config\.json: r = 0"):
        load_checkpoint(tmp_path / "adapter", merge_adapter=False)
    config_file.write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(DaulatError, match=r"adapter_config\.json: use_dora = True"):
        load_checkpoint(tmp_path / "adapter", merge_adapter=False)


def test_a_corrupt_adapter_file_is_named_and_the_previous_adapter_survives_a_failed_save(base_dir, tmp_path):
    model = adapted(base_dir)
    lora.save_adapter(model, tmp_path / "adapter")
    saved = file_hashes(tmp_path / "adapter")
    with pytest.raises(DaulatError, match="is the base checkpoint itself"):
        lora.save_adapter(model, base_dir)
    with pytest.raises(DaulatError, match="no LoRA adapters"):
        lora.save_adapter(load_model(base_dir), tmp_path / "adapter", base_dir)
    assert file_hashes(tmp_path / "adapter") == saved and not list(tmp_path.glob(".adapter.tmp-*"))
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DaulatError, match=r"adapter_model\.safetensors: cannot read safetensors"):
        load_checkpoint(tmp_path / "adapter", merge_adapter=False)


def test_resuming_into_a_lora_run_needs_an_adapter_of_the_same_architecture(base_dir, tmp_path):
    lora.save_adapter(adapted(base_dir), tmp_path / "adapter")
    model = adapted(base_dir, targets=["q_proj"])
    with pytest.raises(DaulatError, match="is not an adapter directory"):
        lora.resume_into(model, base_dir)
    with pytest.raises(DaulatError, match=r"adapter_model\.safetensors: adapts 'model\.layers\.0\.mlp\.\w+_proj', "
                                          "which this model does not adapt"):
        lora.resume_into(model, tmp_path / "adapter")
    other = load_model(make_base(tmp_path / "other", rope_theta=5e5))
    lora.prepare(other, LoraConfig(rank=4, alpha=8.0), tmp_path / "other")
    with pytest.raises(DaulatError, match=r"its base's rope_parameters is .*10000.*this run's is .*500000"):
        lora.resume_into(other, tmp_path / "adapter")


# ------------------------------------------------------------------------------------------------
# Routed experts (optional): PEFT's fused-expert layout
# ------------------------------------------------------------------------------------------------


def test_routed_expert_adapters_load_in_peft_merge_and_switch_off(tmp_path):
    transformers = require("transformers")
    peft = require("peft")
    base = make_base(tmp_path / "base")
    before = file_hashes(base)
    model = adapted(base, targets=["q_proj"], experts=True)
    units = lora.adapter_units(model)
    assert "layers.1.mlp.experts.base_layer" in units and "layers.2.mlp.experts" in units
    lora.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = tokens()
    with torch.no_grad():
        ours = model(ids)
        assert (ours - peft_model(input_ids=ids).logits).abs().max().item() <= 1e-4
        for unit in lora.lora_layers(model).values():  # the experts' adapters alone change the output
            unit.adapter_on = False
        assert (model(ids) - load_model(base)(ids)).abs().max().item() > 1e-2
        for unit in lora.lora_layers(model).values():
            unit.adapter_on = True
        with lora.adapters_disabled(model):
            assert torch.equal(model(ids), load_model(base)(ids))
        loaded = load_checkpoint(tmp_path / "adapter", merge_adapter=False).model
        assert torch.equal(loaded(ids), ours)
        lora.merge_lora(model)
        assert (model(ids) - ours).abs().max().item() <= 1e-5
    assert set(model.state_dict()) == set(load_model(base).state_dict())  # an ordinary model again
    assert file_hashes(base) == before


def test_experts_only_adapter_and_a_model_without_experts(tmp_path):
    base = make_base(tmp_path / "base")
    model = adapted(base, targets=[], experts=True)
    assert not lora.lora_layers(model) and len(lora.adapter_units(model)) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".parametrizations." in n and ".lora_" in n for n in trainable)
    lora.save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "adapter", merge_adapter=False).model(tokens()), model(tokens()))
    dense = load_model(make_base(tmp_path / "dense", first_k_dense_replace=3))
    with pytest.raises(DaulatError, match="lora.experts = true: this model has no routed experts"):
        lora.apply_lora(dense, LoraConfig(rank=4, experts=True))
    assert all(p.requires_grad for p in dense.parameters())


# ------------------------------------------------------------------------------------------------
# What the stages call
# ------------------------------------------------------------------------------------------------


def test_prepare_continues_merges_or_leaves_alone_and_frozen_base_is_the_reference(base_dir, tmp_path):
    plain = load_model(base_dir)
    assert lora.prepare(plain, LoraConfig(), base_dir) is None and lora.prepare(plain, None, base_dir) is None
    assert not lora.is_lora(plain) and all(p.requires_grad for p in plain.parameters())

    fresh = load_model(base_dir)
    lora.prepare(fresh, LoraConfig(rank=4), base_dir)
    reference = lora.FrozenBase(fresh)  # a new LoRA run's reference: the base with adapters off, no copy
    ids = tokens()
    with torch.no_grad():
        for layer in lora.adapter_units(fresh).values():
            layer.lora_B.weight.add_(0.1)
        assert torch.equal(reference(ids), plain(ids)) and not torch.equal(fresh(ids), plain(ids))
    assert reference.snapshot is None and reference.config is fresh.config

    model = adapted(base_dir)
    lora.save_adapter(model, tmp_path / "adapter")

    again = load_checkpoint(tmp_path / "adapter", merge_adapter=False).model  # e.g. GRPO after a LoRA SFT: train the same adapter
    record = lora.prepare(again, LoraConfig(rank=4), "ignored: the adapter names its base")
    assert record["base"] == str(base_dir.resolve()) and record["rank"] == 4
    reference = lora.FrozenBase(again)  # the SFT policy, not the bare base: a snapshot of the adapters
    with torch.no_grad():
        start = again(ids)
        for layer in lora.adapter_units(again).values():  # an optimizer step moves the live adapters
            layer.lora_B.weight.add_(0.1)
        moved = again(ids)
        assert torch.equal(reference(ids), start) and torch.equal(again(ids), moved) and not torch.equal(moved, start)
    with pytest.raises(DaulatError, match="lora.rank = 8: the adapter this run starts from has rank 4"):
        lora.prepare(again, LoraConfig(rank=8), base_dir)
    assert lora.prepare(again, None, base_dir) is None  # full fine-tuning from an adapter: merged, unfrozen
    assert not lora.is_lora(again) and all(p.requires_grad for p in again.parameters())
    with torch.no_grad():
        assert (again(ids) - moved).abs().max().item() <= 1e-5


def test_cached_decoding_sees_a_live_kv_b_proj_adapter(base_dir):
    from daulat.model import LatentCache

    model = adapted(base_dir, targets=["kv_b_proj"])
    ids = tokens(1, 8)
    with torch.no_grad():
        full = model(ids)[:, -1]
        cache = LatentCache(model.config, 1, 16)
        model(ids[:, :7], positions=torch.arange(7)[None], cache=cache)
        last = model(ids[:, 7:], positions=torch.tensor([[7]]), cache=cache)[:, -1]
    assert (last - full).abs().max().item() <= 1e-4
