"""Model cards: every Annex XI field filled from daulat.json, history carried across stages."""

from daulat.checkpoint import load_info, save_model
from daulat.cli import main
from daulat.model import DeepseekV3, ModelConfig
from daulat.provenance import energy_estimate, stage_info, training_flops
from daulat.report import annex_xi, missing_fields


def _model():
    return DeepseekV3(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                  num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                                  qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2))


def _compute(model, tokens, seconds):
    return {"tokens": tokens, "wall_time_s": seconds,
            "flops": training_flops(model.config, tokens, 64, model.num_parameters(active=True)),
            "energy": energy_estimate(seconds, "cpu", cpu_threads=2)}


def test_card_fills_every_annex_xi_field_and_keeps_history(tmp_path, capsys):
    model = _model()
    manifest = {"sources": [{"path": "docs/", "licence": "cc-by-4.0"}], "documents": 1, "bytes": 120,
                "files": [{"path": "docs/a.txt", "bytes": 120, "sha256": "ab" * 32, "licence": "cc-by-4.0"}]}
    pre = stage_info("pretrain", method="next-token prediction", config={"train": {"seed": 1}},
                     data={"manifest": manifest, "tokens": 1000}, compute=_compute(model, 1000, 10.0),
                     metrics={"val_loss": 2.5})
    save_model(model, tmp_path / "pre", info=pre)
    sft = stage_info("sft", method="supervised fine-tuning on assistant tokens", config={"train": {"seed": 2}},
                     data={"generator": "daulat.data.tasks:addition", "seed": 2, "examples": 500},
                     compute=_compute(model, 500, 5.0), metrics={"accuracy": 0.4}, parent=load_info(tmp_path / "pre"))
    save_model(model, tmp_path / "sft", info=sft)

    card = annex_xi(model, load_info(tmp_path / "sft"))
    assert missing_fields(card) == []
    assert [s["stage"] for s in card["training_method"]] == ["pretrain", "sft"]
    assert card["compute_flops"] == pre["compute"]["flops"] + sft["compute"]["flops"]
    assert card["license"] == "cc-by-4.0"
    assert card["data"][0]["documents"] == 1 and card["data"][0]["sha256"] == ["ab" * 32]
    assert card["parameters_active"] < card["parameters_total"]

    readme = (tmp_path / "sft" / "README.md").read_text()
    assert readme.startswith("---\nlicense: cc-by-4.0\n") and "- sft" in readme and "kWh" in readme
    assert main(["card", str(tmp_path / "sft")]) == 0
    assert "## Data" in capsys.readouterr().out


def test_missing_fields_are_reported():
    card = annex_xi(_model(), {})
    assert "compute_flops" in missing_fields(card) and "training_time_s" in missing_fields(card)
