"""Corpus ingestion: formats, skipping bad files with counted reasons, the data manifest, sources."""

import gzip
import hashlib
import json
import logging

import pytest
from conftest import require

from daulat.data.corpus import Corpus, Source, iter_documents, parse_source
from daulat.errors import DaulatError


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("Hello world.\nSecond line é 😀.\n", encoding="utf-8")
    (root / "sub" / "b.md").write_text("# Title\n\nSome *markdown*.", encoding="utf-8")
    (root / "c.jsonl").write_text(
        '{"text": "first record"}\n'
        "not json\n"
        '{"other": "no text field"}\n'
        '{"text": "   "}\n'
        "\n"
        '{"text": "second record \\u2028 with a line separator"}\n',
        encoding="utf-8",
    )
    (root / "d.txt.gz").write_bytes(gzip.compress("compressed document".encode()))
    (root / "e.jsonl.gz").write_bytes(gzip.compress(b'{"text": "gz record"}\n'))
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00rest")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.md").write_text(" \n\t\n")
    (root / "dup.txt").write_bytes((root / "a.txt").read_bytes())
    (root / "broken.txt.gz").write_bytes(b"\x1f\x8bnot really gzip")
    (root / "image.png").write_bytes(b"\x89PNG\x00")
    (root / ".hidden" / "x.txt").write_text("never read")
    return root


def test_folder_reads_formats_skips_bad_files_and_counts_reasons(data_dir, caplog):
    corpus = Corpus(str(data_dir))
    with caplog.at_level(logging.WARNING, logger="daulat.data"):
        documents = list(corpus)
    assert documents == [
        "Hello world.\nSecond line é 😀.\n",
        "first record",
        "second record \u2028 with a line separator",
        "compressed document",
        "gz record",
        "# Title\n\nSome *markdown*.",
    ]
    m = corpus.manifest
    assert [f["path"] for f in m["files"]] == [f"{data_dir}/{p}" for p in ("a.txt", "c.jsonl", "d.txt.gz", "e.jsonl.gz", "sub/b.md")]
    for entry in m["files"]:
        raw = open(entry["path"], "rb").read()
        assert entry["bytes"] == len(raw) and entry["sha256"] == hashlib.sha256(raw).hexdigest()
    assert [f["documents"] for f in m["files"]] == [1, 2, 1, 1, 1]
    assert m["documents"] == 6 and m["bytes"] == sum(f["bytes"] for f in m["files"])
    assert m["skipped"] == {"binary": 1, "not_utf8": 1, "empty": 2, "duplicate": 1, "corrupt": 1, "unsupported": 1}
    assert m["skipped_records"] == {"bad_json": 1, "no_text_field": 1, "empty": 1}
    assert json.loads(json.dumps(m)) == m  # JSON-able as it is
    assert any("1 binary" in r.getMessage() and "1 duplicate" in r.getMessage() for r in caplog.records)
    assert list(corpus) == documents and corpus.manifest == m  # a second pass: same order, same manifest


def test_explicit_files_licences_and_text_field(tmp_path):
    (tmp_path / "notes.rst").write_text("explicit files of any suffix are text")
    (tmp_path / "x.jsonl").write_text('{"body": "from body"}\n{"text": "from text"}\n')
    docs, manifest = iter_documents(
        [f"{tmp_path}/notes.rst:licence=cc-by-4.0", {"path": tmp_path / "x.jsonl", "license": "mit", "text_field": "body"}]
    )
    assert list(docs) == ["explicit files of any suffix are text", "from body"]
    assert [(f["licence"], f["format"]) for f in manifest["files"]] == [("cc-by-4.0", "text"), ("mit", "jsonl")]
    assert manifest["skipped_records"] == {"no_text_field": 1}


def test_parquet(tmp_path):
    pa = require("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["row one", None, "row three"], "id": [1, 2, 3]}), tmp_path / "t.parquet")
    pq.write_table(pa.table({"id": [1]}), tmp_path / "no_field.parquet")
    corpus = Corpus([f"{tmp_path}:text_field=content"])
    assert list(corpus) == ["row one", "row three"]
    assert corpus.manifest["skipped"] == {"no_text_field": 1}
    assert corpus.manifest["skipped_records"] == {"no_text_field": 1}
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DaulatError, match="no usable documents.*1 corrupt"):
        list(Corpus(tmp_path / "bad.parquet"))


def test_missing_path_and_nothing_usable(tmp_path):
    with pytest.raises(DaulatError, match="data path not found: .*nope.txt"):
        Corpus([tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_text("")
    corpus = Corpus(tmp_path)
    with pytest.raises(DaulatError, match="no usable documents.*1 empty"):
        list(corpus)
    with pytest.raises(DaulatError):
        Corpus([])


def test_parse_source():
    assert parse_source("a/b.txt") == Source("a/b.txt")
    assert parse_source("a/b.txt:licence=cc0") == Source("a/b.txt", "cc0")
    assert parse_source("dir:license=mit,text_field=body") == Source("dir", "mit", "body")
    assert parse_source("C:/data/x.txt") == Source("C:/data/x.txt")  # a drive letter is not an option
    with pytest.raises(DaulatError, match="unknown option"):
        parse_source("a.txt:licnce=mit")
    with pytest.raises(DaulatError):
        parse_source({"licence": "mit"})
