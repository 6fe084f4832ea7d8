"""Data parallelism: `torchrun --nproc-per-node 2` with FSDP2 on gloo follows the single-process loss curve."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daulat.data.tasks import default_corpus
from daulat.tokenizer import train_tokenizer

pytestmark = pytest.mark.slow  # over ~10 s: left out of the fast loop (-m 'not slow')

STEPS = 8


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_fsdp2_ranks_on_gloo_match_one_process(tmp_path):
    tokenizer = tmp_path / "tok"
    train_tokenizer(default_corpus(600, seed=0), vocab_size=512).save(tokenizer)
    common = ["pretrain", "--preset", "micro", "--tokenizer", str(tokenizer), "--steps", str(STEPS),
              "train.log_every=1", "train.eval_every=4", "train.batch_size=16", "data.builtin_docs=600",
              "data.val_fraction=0.1", "train.device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    single = subprocess.Popen([sys.executable, "-m", "daulat.cli", *common, "--out", str(tmp_path / "one")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # two ranks, each with two micro-batches of 4 rows: the same 16 sequences per step as the single process
    def torchrun(*extra):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 "-m", "daulat.cli", *common[:1], "--out", str(tmp_path / "two"), "--save-every", "4",
                                 *extra, *common[1:], "train.grad_accum=2"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    for proc in (single, torchrun()):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]

    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]
        for key in ("loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-4, (a, b)
        if "expert_load" in a:  # the load is counted over the global batch on every rank alike
            for la, lb in zip(a["expert_load"], b["expert_load"]):
                assert max(abs(x - y) for x, y in zip(la, lb)) <= 2e-3  # a near-tie may route one token differently
    assert len([r for r in one if "loss" in r]) == STEPS
    info = json.loads((tmp_path / "two" / "final" / "daulat.json").read_text())
    assert info["compute"]["hardware"]["world_size"] == 2
    # the checkpoint written from the shards is the whole model, loadable as usual
    from daulat.checkpoint import load_model

    a = load_model(tmp_path / "one" / "final").state_dict()
    b = load_model(tmp_path / "two" / "final").state_dict()
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3

    # resuming under FSDP (optimizer moments re-sharded from the checkpoint) continues bitwise
    weights = (tmp_path / "two" / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "two" / "final")
    shutil.rmtree(tmp_path / "two" / "step-000008")
    resumed = torchrun("--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    loss = lambda rs: [(r["step"], r.get("loss"), r.get("val_loss")) for r in rs]  # noqa: E731
    assert loss(records(tmp_path / "two")) == loss(two)
    assert (tmp_path / "two" / "final" / "model.safetensors").read_bytes() == weights


def test_lora_sft_under_torchrun_matches_one_process_and_resumes_bitwise(tmp_path):
    """LoRA under FSDP2: the frozen base sharded with the adapters, the same losses and adapters as one
    process, a PEFT adapter directory written from the shards, and a resume that continues bitwise."""
    import dataclasses

    import torch

    from daulat import lora
    from daulat.checkpoint import load_checkpoint, save_model
    from daulat.config import read_preset
    from daulat.model import DeepseekV3, ModelConfig

    prompt = "Toss a coin."
    tokenizer = train_tokenizer([f"{prompt} Answer: heads", f"{prompt} Answer: tails"] * 50, 300)
    config = dataclasses.replace(ModelConfig(**read_preset("micro")["model"]), vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    save_model(DeepseekV3(config), tmp_path / "base", tokenizer=tokenizer)
    with open(tmp_path / "chats.jsonl", "w") as f:
        for i in range(32):
            messages = [{"role": "user", "content": prompt + " " * (i % 3)},
                        {"role": "assistant", "content": f"Answer: {('tails', 'heads')[i % 2]}"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    common = ["sft", "--init", str(tmp_path / "base"), "--data", str(tmp_path / "chats.jsonl"), "--lora-rank", "4",
              "--preset", "micro", "--steps", "4", "train.batch_size=8", "train.log_every=1", "train.eval_batches=0",
              "train.lr=1e-2", "train.device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)

    def run(out, *extra, ranks=1):
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
        done = subprocess.run([sys.executable, *launch, "-m", "daulat.cli", *common, "--out", str(tmp_path / out), *extra],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    run("one")
    run("two", "train.grad_accum=2", "--save-every", "2", ranks=2)
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) <= 1e-4
    adapters = [lora.adapter_state_dict(load_checkpoint(tmp_path / d / "final", merge_adapter=False).model)
                for d in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys()
    assert max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0]) <= 1e-4
    assert lora.is_adapter_dir(tmp_path / "two" / "final")

    written = (tmp_path / "two" / "final" / "adapter_model.safetensors").read_bytes()
    for later in ("step-000004", "final"):
        shutil.rmtree(tmp_path / "two" / later)
    run("two", "train.grad_accum=2", "--save-every", "2", "--resume", ranks=2)
    assert [(r["step"], r["loss"]) for r in records(tmp_path / "two")] == [(r["step"], r["loss"]) for r in two]
    assert (tmp_path / "two" / "final" / "adapter_model.safetensors").read_bytes() == written
