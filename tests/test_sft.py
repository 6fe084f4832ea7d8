"""SFT: the loss is taken on assistant tokens only, with padding or packing; data errors are one line."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from daulat import cli
from daulat.checkpoint import load_info, save_model
from daulat.config import read_preset
from daulat.model import DeepseekV3, ModelConfig
from daulat.tokenizer import train_tokenizer
from daulat.train.sft import (
    IGNORE_INDEX, ConversationBatches, collate, encode_conversations, pack_examples, sft_objective,
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "Answer: 5"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the word: cat"},
     {"role": "assistant", "content": "Answer: tac"}, {"role": "user", "content": "And dog?"},
     {"role": "assistant", "content": "Answer: god"}],
    [{"role": "user", "content": "Which is larger: 12 or 21?"}, {"role": "assistant", "content": "21 is larger.\nAnswer: 21"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for c in CONVERSATIONS for m in c] * 20
    return train_tokenizer(texts, 300)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = dataclasses.replace(ModelConfig(**read_preset("micro")["model"]), vocab_size=tokenizer.vocab_size)
    return DeepseekV3(config)


def assistant_targets(tokenizer, messages):
    """The tokens SFT must learn, in order: each assistant turn's content and its closing <|eos|>."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            out += tokenizer.encode(m["content"]) + [tokenizer.eos_id]
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_targets_are_exactly_the_assistant_tokens(tokenizer, pack):
    examples, counts = encode_conversations(CONVERSATIONS, tokenizer, seq_len=128)
    assert counts == {"conversations": 3, "cut": 0, "skipped": 0}
    rows = pack_examples(examples, 128) if pack else examples
    assert len(rows) == (1 if pack else 3)
    inputs, targets = collate(rows, tokenizer.pad_id)
    learned = [t for t in targets.flatten().tolist() if t != IGNORE_INDEX]
    expected = [t for c in CONVERSATIONS for t in assistant_targets(tokenizer, c)]
    if pack:  # packing reorders conversations (longest first); compare as multisets
        assert sorted(learned) == sorted(expected)
    else:
        assert learned == expected
    # inputs are the row itself, padded on the right; padding never has a target
    assert (targets[inputs == tokenizer.pad_id] == IGNORE_INDEX).all()
    for row, (ids, mask) in enumerate(rows):
        assert inputs[row, : len(ids) - 1].tolist() == ids[:-1]
        # a target is set exactly where the NEXT token is an assistant token
        assert [t != IGNORE_INDEX for t in targets[row, : len(ids) - 1].tolist()] == [bool(m) for m in mask[1:]]


def test_loss_is_cross_entropy_on_assistant_tokens_only(tokenizer, model):
    examples, _ = encode_conversations(CONVERSATIONS, tokenizer, seq_len=128)
    inputs, targets = collate(examples, tokenizer.pad_id)
    loss, stats = sft_objective(model, (inputs, targets))
    logits = model(inputs).float()
    keep = targets != IGNORE_INDEX
    manual = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, manual, atol=1e-5) and torch.allclose(stats["ce"], manual, atol=1e-5)
    # changing what the user says (as targets) changes nothing; changing an assistant token does
    logits.retain_grad()
    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX).backward()
    assert logits.grad[~keep].abs().max() == 0 and logits.grad[keep].abs().sum() > 0


def test_long_conversations_are_cut_and_ones_without_answers_skipped(tokenizer):
    no_answer = [{"role": "user", "content": "hello there"}]
    examples, counts = encode_conversations(CONVERSATIONS + [no_answer], tokenizer, seq_len=12)
    assert counts["cut"] >= 2 and counts["skipped"] >= 1
    assert all(len(ids) <= 13 and any(mask[1:]) for ids, mask in examples)
    rows = pack_examples(examples * 3, 12)
    assert all(len(ids) <= 13 for ids, _ in rows) and sum(len(i) for i, _ in rows) == 3 * sum(len(i) for i, _ in examples)


def test_batches_resume_exactly_and_ranks_split_the_batch(tokenizer):
    examples, _ = encode_conversations(CONVERSATIONS * 5, tokenizer, seq_len=128)
    a = ConversationBatches(examples, 4, tokenizer.pad_id, seed=3)
    for _ in range(5):
        next(a)
    b = ConversationBatches(examples, 4, tokenizer.pad_id, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        x, y = next(a), next(b)
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    whole = next(ConversationBatches(examples, 4, tokenizer.pad_id, seed=1))[0]
    halves = [next(ConversationBatches(examples, 4, tokenizer.pad_id, seed=1, rank=r, world_size=2))[0] for r in (0, 1)]
    assert sum(h.shape[0] for h in halves) == 4
    assert halves[0][0, :5].tolist() == whole[0, :5].tolist() and halves[1][0, :5].tolist() == whole[2, :5].tolist()


def test_sft_command_trains_and_writes_the_stage_layout(tmp_path, tokenizer, model):
    save_model(model, tmp_path / "init", tokenizer=tokenizer)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 4))
    out = tmp_path / "sft"
    argv = ["sft", "--init", str(tmp_path / "init"), "--data", str(data), "--out", str(out), "--preset", "micro",
            "--steps", "2", "--save-every", "2", "train.batch_size=4", "train.log_every=1", "sft.pack=true"]
    assert cli.main(argv) == 0
    assert (out / "final" / "model.safetensors").is_file() and (out / "step-000002").is_dir()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2]
    info = load_info(out / "final")
    assert info["stage"] == "sft" and info["data"]["assistant_tokens"] > 0 and info["config"]["sft"]["pack"] is True
    assert cli.main(argv) == 2  # refuses to train over checkpoints without --resume
    assert cli.main(argv + ["--steps", "3", "--resume"]) == 0
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == [1, 2, 3]


@pytest.mark.parametrize("content,words", [
    ("not json\n", "chats.jsonl:1: not JSON"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "chats.jsonl:1: message 0 needs 'role'"),
    ('{"text": "hi"}\n', 'chats.jsonl:1: expected {"messages"'),
    ("", "has no conversations"),
])
def test_bad_data_is_a_one_line_error(tmp_path, tokenizer, model, capsys, content, words):
    save_model(model, tmp_path / "init", tokenizer=tokenizer)
    (tmp_path / "chats.jsonl").write_text(content)
    argv = ["sft", "--init", str(tmp_path / "init"), "--data", str(tmp_path / "chats.jsonl"), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err
    assert not (tmp_path / "out").exists()  # bad input leaves nothing behind


@pytest.mark.slow
def test_errors_from_the_command_line_have_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "daulat.cli", "sft", "--init", str(tmp_path / "missing"), "--task",
                           "addition", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
