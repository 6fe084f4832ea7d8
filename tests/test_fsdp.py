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
