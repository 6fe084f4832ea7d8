"""Evaluation: the unbiased pass@k estimator, perplexity, and `daulat eval` output (human lines + one JSON line)."""

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch

from daulat import cli
from daulat.checkpoint import save_model
from daulat.config import read_preset
from daulat.data.tasks import default_corpus
from daulat.eval import ks_for, pass_at_k, perplexity
from daulat.model import DeepseekV3, ModelConfig
from daulat.tokenizer import train_tokenizer


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(10, 0, 1) == 0 and pass_at_k(10, 0, 10) == 0
    assert pass_at_k(10, 10, 1) == 1 and pass_at_k(10, 1, 10) == 1
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for n, c, k in [(8, 2, 4), (20, 5, 3), (200, 7, 50)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-9)
    # the mean over random draws of k from the n samples converges to it
    rng, samples = random.Random(0), [1] * 3 + [0] * 5
    drawn = sum(any(rng.sample(samples, 2)) for _ in range(20000)) / 20000
    assert drawn == pytest.approx(pass_at_k(8, 3, 2), abs=0.01)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    assert ks_for(8) == [1, 2, 4, 8] and ks_for(6) == [1, 2, 4, 6] and ks_for(1) == [1]


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    config = ModelConfig(**read_preset("micro")["model"])
    model = DeepseekV3(config)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: uniform over the vocabulary
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, 600)
    result = perplexity(model, tokens, seq_len=64, batch_size=4)
    assert result["perplexity"] == pytest.approx(config.vocab_size, rel=1e-4)
    assert result["tokens"] == (len(tokens) - 1) // 64 * 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "ckpt"
    tokenizer = train_tokenizer(default_corpus(300, seed=0), 400)
    torch.manual_seed(0)
    config = dataclasses.replace(ModelConfig(**read_preset("micro")["model"]), vocab_size=tokenizer.vocab_size)
    save_model(DeepseekV3(config), path, tokenizer=tokenizer)
    return path


def test_eval_command_prints_a_summary_and_one_json_line(checkpoint, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("The sum of 12 and 30 is 42. " * 40)
    argv = ["eval", str(checkpoint), "--task", "addition", "-n", "3", "--samples", "2", "--max-tokens", "6",
            "--text", str(text), "--seq-len", "32"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["task"] == "addition" and report["problems"] == 3
    assert 0 <= report["accuracy"] <= 1 and set(report["pass@k"]) == {"1", "2"}
    assert report["mean_answer_tokens"] <= 6 and report["perplexity"] > 1
    assert any("greedy accuracy" in line for line in out) and any("perplexity" in line for line in out)


@pytest.mark.parametrize("argv,words", [
    (["--task", "nonsense"], "unknown task"),
    ([], "nothing to evaluate"),
    (["--task", "addition", "--samples", "-1"], "--samples"),
])
def test_eval_errors_are_one_line(checkpoint, capsys, argv, words):
    assert cli.main(["eval", str(checkpoint), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_a_task_written_in_python_is_found_by_module_and_name(tmp_path, monkeypatch):
    from daulat.data.tasks import TASKS
    from daulat.errors import DaulatError
    from daulat.eval import load_task

    (tmp_path / "my_tasks.py").write_text(
        "from daulat.data.tasks import Example, register_task\n"
        "def sample(rng):\n"
        "    n = rng.randint(0, 99)\n"
        "    return Example(f'Is {n} even?', 'yes' if n % 2 == 0 else 'no', f'Answer: {\"yes\" if n % 2 == 0 else \"no\"}')\n"
        "register_task('parity', sample, description='say whether a number is even')\n")
    monkeypatch.chdir(tmp_path)
    try:
        task = load_task("my_tasks:parity")
        example = task.sample(random.Random(0))
        assert task.check(example.solution_text, example) and task.eval_examples(3)
        with pytest.raises(DaulatError, match="cannot import"):
            load_task("no_such_module:parity")
    finally:
        TASKS.pop("parity", None)
        import sys

        sys.modules.pop("my_tasks", None)
