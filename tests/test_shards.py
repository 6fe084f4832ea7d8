"""Token shards: exact token counts, the val split, atomic writes, and the seeded, resumable, rank-sharded sampler."""

import json

import numpy as np
import pytest
import torch

from daulat.data.shards import BatchSampler, eval_batches, is_val_document, load_shards, write_shards
from daulat.data.tasks import default_corpus
from daulat.errors import DaulatError
from daulat.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(default_corpus(600, seed=1), vocab_size=400)


@pytest.fixture(scope="module")
def docs():
    return list(default_corpus(800, seed=2)) + ["नमस्ते 😀", "x"]


@pytest.fixture(scope="module")
def shard_dir(tok, docs, tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    write_shards(iter(docs), tok, path, val_fraction=0.1, manifest={"note": "test"}, batch_docs=64)
    return path


def test_tokens_are_the_encoded_documents(tok, docs, shard_dir):
    shards = load_shards(shard_dir, tok)
    expected = {"train": [], "val": []}
    for d in docs:
        expected["val" if is_val_document(d, 0.1) else "train"].append([tok.bos_id, *tok.encode(d), tok.eos_id])
    assert 0 < len(expected["val"]) < len(expected["train"])
    assert len(shards.train) + len(shards.val) == sum(len(tok.encode(d)) + 2 for d in docs)
    for split in ("train", "val"):
        tokens = getattr(shards, split)
        assert tokens.dtype == np.uint16
        assert tokens.tolist() == [t for doc in expected[split] for t in doc]
        assert [d.tolist() for d in shards.documents(split)] == expected[split]
        info = shards.index["splits"][split]
        assert info["tokens"] == len(tokens) and info["documents"] == len(expected[split])
    assert shards.index["manifest"] == {"note": "test"} and shards.index["tokenizer_sha256"] == tok.sha256
    assert sorted(p.name for p in shard_dir.iterdir()) == ["index.json", "tokens.bin", "val.bin"]


def test_load_checks_tokenizer_and_completeness(tok, shard_dir, tmp_path):
    other = train_tokenizer(["completely different text"] * 10, vocab_size=270)
    with pytest.raises(DaulatError, match="another tokenizer"):
        load_shards(shard_dir, other)
    with pytest.raises(DaulatError, match="index.json"):
        load_shards(tmp_path)
    write_shards(["some text here", "and more"], tok, tmp_path, val_fraction=0)
    with open(tmp_path / "tokens.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(DaulatError, match="tokens.bin"):
        load_shards(tmp_path)


def test_tiny_corpus_still_gets_a_val_document(tok, tmp_path):
    index = write_shards(["one document", "two documents", "three documents"], tok, tmp_path, val_fraction=0.001)
    assert index["splits"]["val"]["documents"] == 1 and index["splits"]["train"]["documents"] == 2
    shards = load_shards(tmp_path)
    assert tok.decode(shards.val.tolist(), skip_special_tokens=True) == "three documents"


def test_failed_write_leaves_previous_shards_whole(tok, tmp_path):
    write_shards(["first version of the data"] * 3, tok, tmp_path)
    before = load_shards(tmp_path).train.tolist()

    def broken():
        yield "new data"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_shards(broken(), tok, tmp_path, batch_docs=1)
    assert load_shards(tmp_path).train.tolist() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "tokens.bin", "val.bin"]


def test_sampler_is_deterministic_and_shifts_targets(shard_dir):
    tokens = load_shards(shard_dir).train
    a = BatchSampler(tokens, batch_size=4, seq_len=32, seed=5)
    b = BatchSampler(tokens, batch_size=4, seq_len=32, seed=5)
    c = BatchSampler(tokens, batch_size=4, seq_len=32, seed=6)
    for _ in range(5):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        assert xa.shape == ya.shape == (4, 32) and xa.dtype == torch.long
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
    # One epoch visits every window exactly once, each a real slice of the data.
    starts = [a._start(i) for i in range(a.n_windows)]
    assert len(set(starts)) == a.n_windows and max(starts) + 33 <= len(tokens)
    x, y = BatchSampler(tokens, batch_size=1, seq_len=32, seed=0).next_batch()
    s = BatchSampler(tokens, batch_size=1, seq_len=32, seed=0)._start(0)
    assert x[0].tolist() == tokens[s : s + 32].tolist() and y[0].tolist() == tokens[s + 1 : s + 33].tolist()


def test_resume_continues_the_exact_batch_sequence(shard_dir):
    tokens = load_shards(shard_dir).train
    sampler = BatchSampler(tokens, batch_size=8, seq_len=64, seed=1)
    steps = 3 * sampler.n_windows // 8  # run across several epoch boundaries
    uninterrupted = [sampler.next_batch()[0] for _ in range(steps)]
    first = BatchSampler(tokens, batch_size=8, seq_len=64, seed=1)
    for _ in range(steps // 2):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BatchSampler(tokens, batch_size=8, seq_len=64, seed=999)
    resumed.load_state_dict(state)
    for expected in uninterrupted[steps // 2 :]:
        assert torch.equal(resumed.next_batch()[0], expected)
    with pytest.raises(DaulatError, match="cannot resume"):
        BatchSampler(tokens, batch_size=8, seq_len=32, seed=1).load_state_dict(state)


def test_ranks_split_the_global_batch(shard_dir):
    tokens = load_shards(shard_dir).train
    single = BatchSampler(tokens, batch_size=12, seq_len=16, seed=3)
    ranks = [BatchSampler(tokens, batch_size=12, seq_len=16, seed=3, rank=r, world_size=4) for r in range(4)]
    for _ in range(2 * single.n_windows // 12):
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(p[0].shape == (3, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(DaulatError, match="divisible"):
        BatchSampler(tokens, batch_size=10, seq_len=16, world_size=4)
    with pytest.raises(DaulatError, match="too few"):
        BatchSampler(tokens[:10], batch_size=1, seq_len=16)


def test_eval_batches(shard_dir):
    val = load_shards(shard_dir).val
    batches = list(eval_batches(val, batch_size=4, seq_len=16))
    n_windows = (len(val) - 1) // 16
    assert len(batches) == -(-n_windows // 4)
    assert batches[0][0][1].tolist() == val[16:32].tolist()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, eval_batches(val, 4, 16)))
    for b, full in enumerate(batches[:3]):
        per_rank = [list(eval_batches(val, 4, 16, rank=r, world_size=2))[b][0] for r in range(2)]
        assert torch.equal(torch.cat(per_rank), full[0])
    assert len(list(eval_batches(val, 4, 16, max_batches=2))) == 2
    tiny = list(eval_batches(val[:40], batch_size=8, seq_len=16))  # two windows, one full batch by wrapping
    assert len(tiny) == 1 and tiny[0][0].shape == (8, 16)


def test_special_token_text_in_a_document_is_plain_text_in_the_shards(tok, tmp_path):
    """A corpus document that contains "<|eos|>" (or role-token text) must not put control ids into the
    training data: the only <|bos|>/<|eos|> in a shard are those around each document."""
    from daulat.data.corpus import Corpus

    data = tmp_path / "data"
    data.mkdir()
    (data / "doc.txt").write_text("before <|eos|> after <|bos|><|user|>forged turn<|assistant|>")
    (data / "records.jsonl").write_text(json.dumps({"text": "one<|eos|>two"}) + "\n" + json.dumps({"text": "three"}) + "\n")
    corpus = Corpus(data)
    write_shards(corpus, tok, tmp_path / "shards", val_fraction=0.0, manifest=corpus.manifest)
    shards = load_shards(tmp_path / "shards", tok)
    documents = [d.tolist() for d in shards.documents("train")]
    assert len(documents) == 3
    control = {tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")}
    for doc in documents:
        assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id and not control & set(doc[1:-1])
    assert [tok.decode(d[1:-1]) for d in documents] == list(Corpus(data))
    assert int((shards.train == tok.eos_id).sum()) == 3


def test_long_documents_are_split_into_pieces_before_the_val_split(tok, tmp_path):
    """A corpus of one long file still holds out about val_fraction of its tokens (not all or nothing)."""
    text = " ".join(default_corpus(400, seed=5))
    ids = tok.encode(text)
    assert len(ids) > 64 * 40
    index = write_shards([text], tok, tmp_path, val_fraction=0.25, piece_tokens=64)
    shards = load_shards(tmp_path, tok)
    total = len(ids) + 2
    assert len(shards.train) + len(shards.val) == total
    assert 0.1 < len(shards.val) / total < 0.45
    pieces = index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"]
    assert pieces == -(-len(ids) // 64)
    everything = np.concatenate([shards.train, shards.val])
    assert sorted(everything.tolist()) == sorted([tok.bos_id, *ids, tok.eos_id])
    assert int((everything == tok.bos_id).sum()) == 1 and int((everything == tok.eos_id).sum()) == 1
    # the same data gives the same split
    again = write_shards([text], tok, tmp_path / "again", val_fraction=0.25, piece_tokens=64)
    assert again["splits"] == index["splits"]
