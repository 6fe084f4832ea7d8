"""Structured pruning (daulat.prune): cutting a model down keeps exactly what it computes when what is
cut was dead; the importance measures find the dead parts; a wrong target is one line; and
`daulat distill distill.student_init=pruned` starts its student from the teacher."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from daulat.cli import main
from daulat.errors import DaulatError
from daulat.model import DeepseekV3, ModelConfig
from daulat.prune import prune

sys.path.insert(0, str(Path(__file__).parent))
from infer_fixtures import checkpoint  # noqa: E402,F401  (a fixture)

SOURCE = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                     num_hidden_layers=4, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                     qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_routed_experts=8,
                     n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=2, max_position_embeddings=128,
                     rms_norm_eps=1e-12)  # exactness below: the norms' eps is the only thing a cut changes
TARGET = dataclasses.replace(SOURCE, hidden_size=40, intermediate_size=48, moe_intermediate_size=12, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4)


def _rows(n=16, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SOURCE.vocab_size, (n, length), generator=g)


def _random_model(config=SOURCE, seed=0):
    torch.manual_seed(seed)
    model = DeepseekV3(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1 and biases away from 0, as a trained model's
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


@torch.no_grad()
def _dead_parts(model, target, dead_layer=2):
    """Make everything a cut to `target` removes compute nothing: channels beyond target.hidden_size of
    the residual stream, the last heads, neurons and experts, and all of MoE layer `dead_layer`."""
    cfg, keep = model.config, target.hidden_size
    model.embed_tokens.weight[:, keep:] = 0
    for i, layer in enumerate(model.layers):
        att = layer.self_attn
        att.o_proj.weight[keep:] = 0
        per = cfg.qk_nope_head_dim + cfg.v_head_dim
        for head in range(target.num_attention_heads, cfg.num_attention_heads):  # their values are zero
            att.kv_b_proj.weight[head * per + cfg.qk_nope_head_dim:(head + 1) * per] = 0
        mlp = layer.mlp
        if not cfg.is_moe_layer(i):
            mlp.gate_proj.weight[target.intermediate_size:] = 0
            mlp.down_proj.weight[keep:] = 0
            continue
        inter = cfg.moe_intermediate_size
        mlp.gate_up_proj[:, target.moe_intermediate_size:inter] = 0  # gate rows of the neurons cut
        mlp.down_proj[:, keep:] = 0
        mlp.gate.e_score_correction_bias[:target.n_routed_experts] = 0
        mlp.gate.e_score_correction_bias[target.n_routed_experts:] = -1e4  # never chosen
        shared = mlp.shared_experts
        shared.gate_proj.weight[target.moe_intermediate_size:] = 0
        shared.down_proj.weight[keep:] = 0
        if i == dead_layer:  # the whole layer adds nothing to the residual stream
            att.o_proj.weight.zero_()
            mlp.down_proj.zero_()
            shared.down_proj.weight.zero_()
    return model


def test_pruning_to_the_same_shape_changes_nothing():
    model, rows = _random_model(), _rows()
    student, kept = prune(model, SOURCE, rows, torch.ones_like(rows))
    with torch.no_grad():
        assert torch.equal(student.eval()(rows), model(rows))
    assert kept["layers"] == [0, 1, 2, 3] and kept["teacher_loss"] == kept["student_loss"]


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_cutting_dead_channels_heads_neurons_experts_and_a_layer_is_exact(q_lora_rank):
    source = dataclasses.replace(SOURCE, q_lora_rank=q_lora_rank)
    target = dataclasses.replace(TARGET, q_lora_rank=q_lora_rank)
    model, rows = _dead_parts(_random_model(source), target), _rows()
    mask = torch.ones_like(rows)
    mask[:, -5:] = 0  # padding is not calibration
    student, kept = prune(model, target, rows, mask)
    assert kept["layers"] == [0, 1, 3]  # the dead layer 2 is the one dropped
    assert all(h == [0, 1] for h in kept["heads"].values())
    assert all(e == [0, 1, 2, 3] for e in kept["experts"].values())
    assert student.num_parameters() < model.num_parameters() / 2
    with torch.no_grad():
        assert (student.eval()(rows) - model(rows)).abs().max() < 1e-4


def test_the_cut_keeps_the_channels_the_model_uses_and_scales_its_norms():
    model, rows = _random_model(), _rows()
    with torch.no_grad():  # channels 0..39 carry 100x less than the rest
        model.embed_tokens.weight[:, :40] *= 0.01
    target = dataclasses.replace(SOURCE, hidden_size=24)
    student, _ = prune(model, target, rows, torch.ones_like(rows))
    picked = [int((model.embed_tokens.weight == column[:, None]).all(0).nonzero()) for column in student.embed_tokens.weight.T]
    assert min(picked) >= 40 and picked == sorted(picked)
    # the norms are scaled up: the rms of the few channels kept is smaller than that of all of them
    ratio = student.layers[0].input_layernorm.weight / model.layers[0].input_layernorm.weight[picked]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and ratio[0] > 1


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 128}, "more hidden_size"),
    ({"kv_lora_rank": 16}, "keeps the teacher's kv_lora_rank"),
    ({"num_hidden_layers": 5}, "more num_hidden_layers"),
    ({"num_nextn_predict_layers": 1}, "multi-token prediction"),
])
def test_a_target_that_is_not_a_cut_down_teacher_is_refused_in_one_line(change, message):
    model, rows = _random_model(), _rows()
    with pytest.raises(DaulatError, match=message) as error:
        prune(model, dataclasses.replace(SOURCE, **change), rows, torch.ones_like(rows))
    assert "\n" not in str(error.value)


def test_distill_starts_a_pruned_student_from_the_teacher(checkpoint, tmp_path, capsys):
    shape = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=1",
             "model.n_routed_experts=2", "model.moe_intermediate_size=16"]
    common = ["distill", "--teacher", str(checkpoint), "--preset", "micro", "--task", "addition", "--mode", "fkl",
              "--steps", "2", "--seed", "0", "distill.prompts=8", "distill.teacher_sampling.max_tokens=16",
              "distill.filter=false", "distill.drop_truncated=false", "train.batch_size=4", *shape]
    assert main([*common, "--out", str(tmp_path / "pruned"), "distill.student_init=pruned"]) == 0
    info = json.loads((tmp_path / "pruned" / "final" / "daulat.json").read_text())
    init = info["init"]
    assert init["pruned from the teacher to"] == "preset micro" and init["layers"] == [0, 1]
    assert main([*common, "--out", str(tmp_path / "bad"), "distill.student_init=pruned", "model.kv_lora_rank=8"]) == 2
    assert "kv_lora_rank" in capsys.readouterr().err and not (tmp_path / "bad" / "final").exists()


def test_the_tiny_speedruns_student_is_a_cut_of_tiny_five_times_smaller():
    from daulat.architectures import ModelSection
    from daulat.config import load_config
    from daulat.prune import check_prunable
    from daulat.speedrun import SpeedrunConfig

    def model(preset):  # with the tiny speedrun's tokenizer of 1,516 tokens
        return DeepseekV3(dataclasses.replace(load_config({"model": ModelSection}, preset=preset)["model"], vocab_size=1516))

    teacher, student = model("tiny"), model("tiny-student")
    check_prunable(teacher.config, student.config)
    assert teacher.num_parameters() / student.num_parameters() >= 5
    speedrun = load_config({"speedrun": SpeedrunConfig}, preset="tiny")["speedrun"]
    assert speedrun.student_preset == "tiny-student" and "distill.student_init=pruned" in speedrun.distill_overrides
