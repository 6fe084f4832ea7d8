"""LoRA on DeepSeek-V4: the adapted layers are the attention projections (q_a_proj, q_b_proj, kv_proj,
o_a_proj, o_b_proj) and the shared experts, never a compressor or an indexer; PEFT puts daulat's
adapter onto transformers' `DeepseekV4ForCausalLM` with daulat's logits (the routed experts too); the
grouped o_a_proj's adapter is applied, merges exactly and is seen by cached decoding; and `daulat sft
--lora-rank` adapts a V4 checkpoint."""

import dataclasses
import hashlib
import json

import pytest
import torch
from conftest import require

require("transformers")
from test_v4 import CONFIGS, _perturb  # noqa: E402
from test_v4_decode import _run_in_chunks  # noqa: E402

from daulat import cli, lora  # noqa: E402
from daulat.architectures import build_model  # noqa: E402
from daulat.checkpoint import load_checkpoint, load_info, load_model, save_model  # noqa: E402
from daulat.errors import DaulatError  # noqa: E402
from daulat.lora import LoraConfig  # noqa: E402
from daulat.model_v4 import ModelConfigV4  # noqa: E402
from daulat.tokenizer import train_tokenizer  # noqa: E402

ATTENTION = ("q_a_proj", "q_b_proj", "kv_proj", "o_a_proj", "o_b_proj")
SHARED = ("gate_proj", "up_proj", "down_proj")


def file_hashes(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.is_file()}


def randomise_adapters(model, seed=1):
    """Non-zero A and B (a fresh adapter is the identity), so that comparisons mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in lora.adapter_units(model).values():
            for weight in (unit.lora_A.weight, unit.lora_B.weight):
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.2)


def random_v4(name="mix-hc2-hash", seed=3):
    config = ModelConfigV4(**CONFIGS[name][0])
    model = build_model(config).eval()
    _perturb(model, config.n_routed_experts, seed)
    return model


def adapted(model, base=None, **config):
    lora.prepare(model, LoraConfig(**{"rank": 4, "alpha": 8.0, **config}), base or "unsaved")
    randomise_adapters(model)
    return model


def ids(model, B=2, T=37, seed=0):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, experts", [("mix-hc2-hash", False), ("sigmoid-tied-4groups", True)])
def test_peft_loads_the_v4_adapter_onto_transformers_with_daulats_logits(name, experts, tmp_path):
    transformers = require("transformers")
    peft = require("peft")
    model = random_v4(name)
    save_model(model, tmp_path / "base")
    before = file_hashes(tmp_path / "base")
    adapted(model, tmp_path / "base", experts=experts)
    lora.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["self_attn.kv_proj", "self_attn.o_b_proj", "self_attn.q_a_proj",
                                        "self_attn.q_b_proj"]  # not the compressors' kv_proj, the indexers' q_b_proj
    assert config["target_parameters"][:4] == ["self_attn.o_a_proj.weight", "shared_experts.down_proj.weight",
                                               "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32,
                                                           attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert wrapped == {"base_model.model.model." + n for n in lora.adapter_units(model)}  # the same layers, no more
    saved = load_checkpoint(tmp_path / "adapter", merge_adapter=False).model  # names mapped back
    assert set(peft.get_peft_model_state_dict(peft_model)) == set(lora.adapter_state_dict(saved))
    tokens = ids(model)
    with torch.no_grad():
        ours = model(tokens)
        assert (ours - peft_model(input_ids=tokens).logits).abs().max().item() <= 1e-4
        assert torch.equal(saved(tokens), ours)
        with lora.adapters_disabled(model):
            assert (model(tokens) - ours).abs().max().item() > 1e-2  # the adapter really changes the output
    assert file_hashes(tmp_path / "base") == before


def test_default_targets_are_the_attention_projections_and_shared_experts_never_a_compressor():
    model = adapted(random_v4("mix-hc2-hash"))  # CSA (compressor + indexer), HCA and sliding layers
    layers = range(model.config.num_hidden_layers)
    assert set(lora.lora_layers(model)) == {f"layers.{i}.self_attn.{p}" for i in layers for p in ATTENTION} | {
        f"layers.{i}.mlp.shared_experts.{p}" for i in layers for p in SHARED}
    assert model.lora.targets == sorted(ATTENTION + SHARED)
    chosen = adapted(random_v4("mix-hc2-hash"), targets=["kv_proj", "q_b_proj"])  # leaf names, as --lora-targets
    assert set(lora.lora_layers(chosen)) == {f"layers.{i}.self_attn.{p}" for i in layers
                                            for p in ("kv_proj", "q_b_proj")}
    for target in ("compressor.kv_proj", "indexer.q_b_proj", "gate_proj.weight"):
        with pytest.raises(DaulatError, match=f"lora.targets: '{target}' matches no linear layer"):
            lora.apply_lora(random_v4("mix-hc2-hash"), LoraConfig(rank=4, targets=[target]))


def test_an_o_a_proj_adapter_changes_the_output_and_merges_exactly():
    model = random_v4("sigmoid-tied-4groups")  # four output groups
    tokens = ids(model)
    with torch.no_grad():
        base = model(tokens)
        adapted(model, targets=["o_a_proj"])
        unmerged = model(tokens)
        assert (unmerged - base).abs().max().item() > 1e-2
        lora.merge_lora(model)
        assert not lora.is_lora(model) and (model(tokens) - unmerged).abs().max().item() <= 1e-5


def test_cached_decoding_sees_live_v4_adapters():
    model = adapted(random_v4("mix-hc2-hash"))
    tokens = ids(model, T=23)
    with torch.no_grad():
        full = model(tokens)
        assert (_run_in_chunks(model, tokens, [9, 1, 1, 5, 1, 6]) - full).abs().max().item() <= 1e-4


def test_lora_sft_adapts_a_v4_checkpoint(tmp_path):
    prompt = "Toss a coin."
    tokenizer = train_tokenizer([f"{prompt} Answer: heads", f"{prompt} Answer: tails"] * 50, 300)
    config = dataclasses.replace(ModelConfigV4(), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    save_model(build_model(config), tmp_path / "base", tokenizer=tokenizer)
    with open(tmp_path / "chats.jsonl", "w") as f:
        for i in range(8):
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": f"Answer: {('tails', 'heads')[i % 2]}"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    before = file_hashes(tmp_path / "base")
    out = tmp_path / "sft"
    assert cli.main(["sft", "--init", str(tmp_path / "base"), "--data", str(tmp_path / "chats.jsonl"),
                     "--out", str(out), "--lora-rank", "4", "--preset", "micro", "--steps", "2", "train.batch_size=4",
                     "train.seq_len=32", "train.log_every=1", "train.eval_batches=0", "train.lr=5e-2"]) == 0
    final = out / "final"
    assert lora.is_adapter_dir(final) and load_info(final)["lora"]["rank"] == 4
    live = load_checkpoint(final, merge_adapter=False).model
    assert set(lora.lora_layers(live)) == set(lora.lora_layers(adapted(build_model(config))))
    merged, plain = load_model(final), load_model(tmp_path / "base")
    assert not torch.equal(merged.layers[1].self_attn.o_a_proj.weight, plain.layers[1].self_attn.o_a_proj.weight)
    assert file_hashes(tmp_path / "base") == before
