"""LoRA through the stages: `daulat sft/grpo/distill --lora-rank R` train adapters on a frozen checkpoint,
OUT/final is a PEFT adapter directory that transformers + PEFT read with daulat's logits, every
command that takes a checkpoint takes it (merged on load), the base's files are never written, and a
bad rank or target is one line with exit code 2 and nothing written."""

import dataclasses
import hashlib
import json
import shutil

import pytest
import torch
from conftest import require

from daulat import cli, lora
from daulat.checkpoint import load_checkpoint, load_info, load_model, save_model
from daulat.config import read_preset
from daulat.model import DeepseekV3, ModelConfig
from daulat.tokenizer import train_tokenizer

PROMPT = "Toss a coin."
STEPS = ["--preset", "micro", "--steps", "2", "train.batch_size=4", "train.log_every=1", "train.eval_batches=0"]


def file_hashes(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A micro checkpoint with a tokenizer, conversations and a checkable coin task beside it."""
    d = tmp_path_factory.mktemp("lora-stages")
    tokenizer = train_tokenizer([f"{PROMPT} Answer: heads", f"{PROMPT} Answer: tails"] * 50, 300)
    config = dataclasses.replace(ModelConfig(**read_preset("micro")["model"]), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    save_model(DeepseekV3(config), d / "base", tokenizer=tokenizer)
    with open(d / "chats.jsonl", "w") as f:
        for i in range(16):
            messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": f"Answer: {('tails', 'heads')[i % 2]}"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(d / "coin.jsonl", "w") as f:
        f.write(json.dumps({"prompt": PROMPT, "answer": "heads", "split": "train"}) + "\n")
        f.write(json.dumps({"prompt": "Toss a coin!", "answer": "heads", "split": "eval"}) + "\n")
    return d


@pytest.fixture(scope="module")
def sft_run(base):
    before = file_hashes(base / "base")
    argv = ["sft", "--init", str(base / "base"), "--data", str(base / "chats.jsonl"), "--out", str(base / "sft"),
            "--lora-rank", "4", "--lora-alpha", "16", *STEPS, "train.lr=5e-2", "--save-every", "1"]
    assert cli.main(argv) == 0
    return base / "sft", before


@pytest.mark.slow  # transformers and PEFT import in ~10 s
def test_lora_sft_writes_a_peft_adapter_with_daulats_logits_and_leaves_the_base_alone(base, sft_run):
    transformers = require("transformers")
    peft = require("peft")
    out, before = sft_run
    final = out / "final"
    assert lora.is_adapter_dir(final) and not (final / "model.safetensors").exists()
    assert lora.is_adapter_dir(out / "step-000001") and (out / "step-000001" / "train_state").is_dir()
    info = load_info(final)
    assert info["stage"] == "sft" and info["lora"]["rank"] == 4 and info["lora"]["alpha"] == 16
    assert 0 < info["lora"]["trainable_fraction"] < 0.5
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((base / "base").resolve()) and config["lora_alpha"] == 16

    model = load_model(final)  # merged on load
    assert not lora.is_lora(model)
    assert not torch.equal(model.layers[0].self_attn.o_proj.weight, load_model(base / "base").layers[0].self_attn.o_proj.weight)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base / "base", dtype=torch.float32, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf, final).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - peft_model(input_ids=ids).logits).abs().max().item() <= 1e-4
    assert file_hashes(base / "base") == before


def test_chat_eval_and_export_take_the_adapter(base, sft_run, capsys):
    final = sft_run[0] / "final"
    assert cli.main(["chat", str(final), "-p", PROMPT, "--max-tokens", "3", "--temperature", "0"]) == 0
    assert cli.main(["eval", str(final), "--task", str(base / "coin.jsonl"), "-n", "1", "--max-tokens", "3"]) == 0
    merged = load_checkpoint(final)
    assert merged.tokenizer is not None and merged.info["lora"]["rank"] == 4
    assert cli.main(["export", str(final), "--format", "hf", "--out", str(base / "exported")]) == 0
    exported = load_model(base / "exported")
    for (name, a), b in zip(merged.model.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_resumed_lora_sft_ends_where_an_uninterrupted_one_does(base, tmp_path):
    argv = ["sft", "--init", str(base / "base"), "--data", str(base / "chats.jsonl"), "--lora-rank", "2",
            "--lora-targets", "q_proj,o_proj", "--preset", "micro", "--steps", "3", "train.batch_size=4", "train.log_every=1",
            "train.eval_batches=0", "lora.dropout=0.1"]
    assert cli.main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert cli.main([*argv, "--out", str(tmp_path / "cut"), "--save-every", "1", "train.keep_last=0"]) == 0
    for later in ("step-000002", "step-000003", "final"):  # as if killed right after step 1 was saved
        shutil.rmtree(tmp_path / "cut" / later)
    assert cli.main([*argv, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    whole = lora.adapter_state_dict(load_checkpoint(tmp_path / "whole" / "final", merge_adapter=False).model)
    resumed = lora.adapter_state_dict(load_checkpoint(tmp_path / "cut" / "final", merge_adapter=False).model)
    assert whole.keys() == resumed.keys() and all(".self_attn.q_proj." in k or ".o_proj." in k for k in whole)
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_grpo_continues_the_sft_adapter_with_the_base_as_its_reference(base, sft_run):
    out = base / "grpo"
    assert cli.main(["grpo", "--init", str(sft_run[0] / "final"), "--task", str(base / "coin.jsonl"), "--out", str(out),
                     "--lora-rank", "4", "--preset", "micro", "--steps", "2", "grpo.prompts_per_rollout=2",
                     "grpo.group_size=4", "train.batch_size=8", "train.log_every=1", "grpo.sampling.max_tokens=4",
                     "grpo.eval_problems=0", "grpo.beta=0.1"]) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [s["step"] for s in steps] == [1, 2] and steps[0]["kl"] == 0 and steps[1]["kl"] >= 0
    info = load_info(out / "final")
    assert lora.is_adapter_dir(out / "final") and info["stage"] == "grpo" and info["lora"]["rank"] == 4
    assert json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((base / "base").resolve())  # the adapter's own base, not the SFT adapter
    assert [h["stage"] for h in info["history"]][-1] == "sft"


@pytest.mark.parametrize("flags, words", [
    (["--lora-rank", "0"], "lora.rank = 0"), (["--lora-rank", "-1"], "lora.rank = -1"),
    (["--lora-rank", "4", "--lora-targets", "q_proj,nonsense"], "'nonsense' matches no linear layer"),
])
@pytest.mark.parametrize("stage", ["sft", "grpo", "distill"])
def test_a_bad_rank_or_target_is_one_line_and_writes_nothing(base, tmp_path, capsys, stage, flags, words):
    out = tmp_path / "out"
    start = {"sft": ["--init", str(base / "base"), "--data", str(base / "chats.jsonl")],
             "grpo": ["--init", str(base / "base"), "--task", str(base / "coin.jsonl")],
             "distill": ["--teacher", str(base / "base"), "--student", str(base / "base"), "--data",
                         str(base / "chats.jsonl"), "--mode", "fkl", "distill.sequences=given"]}[stage]
    assert cli.main([stage, *start, "--out", str(out), *flags, "--preset", "micro", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert not out.exists()


def test_distill_trains_an_adapter_on_the_student(base, tmp_path):
    out = tmp_path / "distill"
    assert cli.main(["distill", "--teacher", str(base / "base"), "--student", str(base / "base"), "--data",
                     str(base / "chats.jsonl"), "--mode", "fkl", "distill.sequences=given", "--out", str(out),
                     "--lora-rank", "2", "--lora-targets", "o_proj", *STEPS]) == 0
    info = load_info(out / "final")
    assert lora.is_adapter_dir(out / "final") and info["stage"] == "distill" and info["lora"]["targets"] == ["o_proj"]
    assert cli.main(["distill", "--teacher", str(base / "base"), "--preset", "micro", "--data", str(base / "chats.jsonl"),
                     "--mode", "fkl", "distill.sequences=given", "--out", str(tmp_path / "fresh"), "--lora-rank", "2"]) == 2
    assert not (tmp_path / "fresh").exists()  # LoRA needs a student checkpoint to adapt
