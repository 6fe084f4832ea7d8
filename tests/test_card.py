"""Model cards: every Annex XI field filled from daulat.json, history carried across stages."""

import ast
import json
from pathlib import Path

import daulat
from daulat import save_model  # the public writer: daulat.json and the model card come with the weights
from daulat.checkpoint import load_info
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


def test_a_model_saved_through_the_public_api_documents_itself(tmp_path, capsys):
    from daulat.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["selamat pagi, dunia. 1 + 2 = 3"] * 20, 300)
    daulat.save_model(_model(), tmp_path / "mine", tokenizer=tokenizer)  # as the README's example does
    info = json.loads((tmp_path / "mine" / "daulat.json").read_text())
    assert info["created"] and info["environment"]["torch"] and info["environment"]["python"]
    assert info["architecture"]["model_type"] == "deepseek_v3"
    assert info["architecture"]["parameters_total"] == _model().num_parameters()
    assert (tmp_path / "mine" / "README.md").read_text().startswith("---\nlicense:")
    assert main(["card", str(tmp_path / "mine")]) == 0
    card = capsys.readouterr().out
    made = card.split("## How it was made", 1)[1].strip().splitlines()[0]
    assert made.startswith("- **save_model**: saved from Python"), made
    assert annex_xi(_model(), info)["release"]["date"] == info["created"]


def test_the_checkpoint_writer_does_not_import_the_card_renderer():
    """checkpoint <-> report was an import cycle: the caller of save_model renders the card now."""
    source = (Path(daulat.__file__).parent / "checkpoint.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert "daulat.report" not in imported and "daulat" not in imported
