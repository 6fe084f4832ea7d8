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
    (root / "sub" / "README").write_text("a file without a suffix is text")
    (root / "sub" / "program").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(64))  # ...unless it is binary
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
        "a file without a suffix is text",
        "# Title\n\nSome *markdown*.",
    ]
    m = corpus.manifest
    # paths relative to the source's root: a model card must not reveal the folders of the machine
    assert [f["path"] for f in m["files"]] == ["a.txt", "c.jsonl", "d.txt.gz", "e.jsonl.gz", "sub/README", "sub/b.md"]
    assert m["sources"] == [{"path": "data", "licence": None}] and str(data_dir.parent) not in json.dumps(m)
    for entry in m["files"]:
        raw = (data_dir / entry["path"]).read_bytes()
        assert entry["bytes"] == len(raw) and entry["sha256"] == hashlib.sha256(raw).hexdigest()
    assert [f["documents"] for f in m["files"]] == [1, 2, 1, 1, 1, 1]
    assert m["documents"] == 7 and m["bytes"] == sum(f["bytes"] for f in m["files"])
    assert m["skipped"] == {"binary": 2, "not_utf8": 1, "empty": 2, "duplicate": 1, "corrupt": 1, "unsupported": 1}
    assert m["skipped_records"] == {"bad_json": 1, "no_text_field": 1, "empty": 1}
    assert sorted((f["path"], f["reason"]) for f in m["skipped_files"]) == [
        ("binary.txt", "binary"), ("blank.md", "empty"), ("broken.txt.gz", "corrupt"), ("dup.txt", "duplicate"),
        ("empty.txt", "empty"), ("image.png", "unsupported"), ("latin1.txt", "not_utf8"), ("sub/program", "binary")]
    assert json.loads(json.dumps(m)) == m  # JSON-able as it is
    assert any("2 binary" in r.getMessage() and "1 duplicate" in r.getMessage() for r in caplog.records)
    assert list(corpus) == documents and corpus.manifest == m  # a second pass: same order, same manifest


def test_explicit_files_licences_and_text_field(tmp_path):
    (tmp_path / "notes.log").write_text("explicit files of any suffix are text")
    (tmp_path / "x.jsonl").write_text('{"body": "from body"}\n{"text": "from text"}\n')
    docs, manifest = iter_documents(
        [f"{tmp_path}/notes.log:licence=cc-by-4.0", {"path": tmp_path / "x.jsonl", "license": "mit", "text_field": "body"}]
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


# --------------------------------------------------------------------------------- hostile inputs
# Each test below builds the input the way a probe found it (real gzip streams, FIFOs, symlinks, deep
# folders) and would fail on a reader that decompresses whole, follows links out, or recurses.

import os
import signal
import subprocess
import sys
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

from daulat.data.corpus import ReadLimits


def gzip_bomb(path, block: bytes, total: int):
    """A valid multi-member gzip file holding `total` bytes of `block` repeated, made by streaming: one
    16 MiB member compressed once and written again and again (gzip concatenates members)."""
    member_size = 16 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = compressor.compress(block * (member_size // len(block))) + compressor.flush()
    with open(path, "wb") as f:
        for _ in range(total // member_size):
            f.write(member)
    return path


@contextmanager
def deadline(seconds):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def fail(*_):
        raise TimeoutError(f"corpus reading took more than {seconds}s (hung?)")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


MEASURE = """
import json, sys, tracemalloc
from daulat.data.corpus import Corpus
tracemalloc.start()
corpus = Corpus(sys.argv[1])
docs = list(corpus)
peak = tracemalloc.get_traced_memory()[1]
# VmHWM: this process's own peak resident memory (ru_maxrss would carry the parent's over fork and exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"docs": docs, "skipped": corpus.manifest["skipped"], "skipped_records": corpus.manifest["skipped_records"],
                  "traced_peak": peak, "peak_rss_kb": hwm}))
"""


def measure(path):
    """Read a corpus in a fresh interpreter; returns the documents, skip counts and peak memory."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_decompression_bombs_cost_little_memory(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "good.txt").write_text("a real document")
    gzip_bomb(root / "zeros.txt.gz", b"\x00", 1 << 30)  # 1 GiB of zeros in about 1 MB
    gzip_bomb(root / "text.txt.gz", b"all work and no play ", 1 << 30)  # 1 GiB of text: one huge document
    assert (root / "zeros.txt.gz").stat().st_size < 2 << 20
    result = measure(root)
    assert result["docs"] == ["a real document"]
    assert result["skipped"] == {"binary": 1, "document_too_large": 1}
    # Streamed: a few 1 MiB blocks at a time, not the 1 GiB (the probe measured 2.3 GB before).
    assert result["traced_peak"] < 40 << 20, result["traced_peak"]
    assert result["peak_rss_kb"] < 200 << 10, result["peak_rss_kb"]


def test_caps_are_configurable_and_counted(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "small.txt").write_text("fits")
    (root / "big.txt").write_text("x" * 5000)
    (root / "records.jsonl").write_text(json.dumps({"text": "y" * 5000}) + "\n" + json.dumps({"text": "short"}) + "\n")
    gzip_bomb(root / "many.jsonl.gz", (json.dumps({"text": "line"}) + "\n").encode(), 64 << 20)
    corpus = Corpus(root, limits=ReadLimits(max_file_bytes=32 << 20, max_document_bytes=1000))
    assert list(corpus) == ["short", "fits"]
    assert corpus.manifest["skipped"] == {"document_too_large": 1, "file_too_large": 1}
    assert corpus.manifest["skipped_records"] == {"document_too_large": 1}
    assert corpus.manifest["limits"] == {"max_file_bytes": 32 << 20, "max_document_bytes": 1000, "follow_links": False}
    with pytest.raises(DaulatError, match="max_document_bytes"):
        ReadLimits(max_document_bytes=0)


def test_a_100_mb_single_line_jsonl_does_not_reach_the_tokenizer_trainer(tmp_path):
    from daulat.tokenizer import train_tokenizer

    path = tmp_path / "one_line.jsonl"
    with open(path, "w") as f:
        f.write('{"text": "')
        for _ in range(100):
            f.write("z" * (1 << 20))
        f.write('"}\n{"text": "a normal record of ordinary words"}\n')
    corpus = Corpus(path)
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    assert corpus.manifest["documents"] == 1 and corpus.manifest["skipped_records"] == {"document_too_large": 1}
    assert tokenizer.decode(tokenizer.encode("ordinary words")) == "ordinary words"


def test_fifos_and_devices_are_skipped_never_read(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "good.txt").write_text("good")
    os.mkfifo(root / "pipe.txt")
    os.symlink("/dev/zero", root / "zero.txt")  # a device behind a name that looks like text
    with deadline(20):
        corpus = Corpus(root, limits=ReadLimits(follow_links=True))
        assert list(corpus) == ["good"]
        assert corpus.manifest["skipped"] == {"not_regular_file": 2}
        for named in (root / "pipe.txt", "/dev/zero"):
            with pytest.raises(DaulatError, match="no readable corpus files.*1 not_regular_file"):
                Corpus([named])


def test_deep_folders_and_deeply_nested_records(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    folder = root
    for _ in range(1100):  # deeper than Python's recursion limit (1000); os.makedirs itself would recurse
        folder = folder / "d"
        folder.mkdir()
    (folder / "bottom.txt").write_text("found at the bottom")
    (root / "nested.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n" + '{"text": "next record"}\n')
    try:
        corpus = Corpus(root)
        assert list(corpus) == ["found at the bottom", "next record"]
        assert corpus.manifest["skipped_records"] == {"bad_json": 1}
    finally:  # shutil.rmtree (and so pytest's clean-up) recurses too: remove bottom-up, pass or fail
        (folder / "bottom.txt").unlink()
        while folder != root:
            folder.rmdir()
            folder = folder.parent


def test_symlinks_follow_only_inside_the_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("never trained on")
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "inner.txt").write_text("inner document")
    (root / "a.txt").write_text("a document")
    os.symlink("/etc/passwd", root / "passwd.txt")
    os.symlink(outside, root / "linked_outside")
    os.symlink(outside / "secret.txt", root / "secret.txt")
    os.symlink(root / "sub", root / "zlink_inside")  # inside the root: followed, but each folder read once
    os.symlink(root, root / "sub" / "loop")
    os.symlink(tmp_path / "gone.txt", root / "broken.txt")
    corpus = Corpus(root)
    assert list(corpus) == ["a document", "inner document"]
    assert corpus.manifest["skipped"] == {"symlink_outside_root": 3, "already_walked": 2, "broken_symlink": 1}
    followed = Corpus(root, limits=ReadLimits(follow_links=True))
    assert "never trained on" in list(followed)
    assert followed.manifest["skipped"]["duplicate"] == 1  # the secret reached through the folder and the file link


def test_unreadable_files_and_folders_are_skipped_and_counted():
    # root reads everything whatever the permission bits, so the reading happens in a child process that
    # has given up root (setuid to nobody) after forking; as a normal user chmod alone is enough.
    root = Path(tempfile.mkdtemp(prefix="daulat-perm-"))
    try:
        root.chmod(0o755)
        (root / "ok.txt").write_text("readable")
        (root / "locked.txt").write_text("locked")
        (root / "locked.txt").chmod(0)
        (root / "closed").mkdir()
        (root / "closed" / "inside.txt").write_text("inside a closed folder")
        (root / "closed").chmod(0)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop root, read the corpus, send back what it saw
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                corpus = Corpus(root)
                docs = list(corpus)
                os.write(write, json.dumps({"docs": docs, "skipped": corpus.manifest["skipped"]}).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            seen = json.loads(pipe.read())
        os.waitpid(pid, 0)
        assert seen == {"docs": ["readable"], "skipped": {"unreadable": 1, "unreadable_folder": 1}}
    finally:
        (root / "closed").chmod(0o755)
        import shutil

        shutil.rmtree(root)


def test_a_file_removed_after_listing_is_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("stays")
    (tmp_path / "b.txt").write_text("goes")
    corpus = Corpus(tmp_path)
    (tmp_path / "b.txt").unlink()
    assert list(corpus) == ["stays"] and corpus.manifest["skipped"] == {"unreadable": 1}


def test_named_binary_file_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "program").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(100))
    with pytest.raises(DaulatError, match="no readable corpus files.*1 binary"):
        Corpus([tmp_path / "program"])
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Length 3 >>\nstream\n\x00\x01\x02")
    with pytest.raises(DaulatError, match=r"no readable corpus files.*1 extractor_failed \(pdf\)"):
        Corpus([tmp_path / "report.pdf"])


def test_pretraining_reads_documents_too(tmp_path):
    """Office and HTML files in a data folder are read through daulat.data.documents, as `daulat corpus`
    reads them; an HTML file named explicitly is read as HTML, not as markup text."""
    import docx

    root = tmp_path / "data"
    root.mkdir()
    document = docx.Document()
    document.add_paragraph("The board approved the new travel policy on Monday.")
    document.save(root / "minutes.docx")
    (root / "page.html").write_text("<html><head><script>var x = 'SCRIPT';</script></head><body><nav>MENU</nav>"
                                    "<p>The cafeteria reopens next week with a new menu for everyone.</p></body></html>")
    corpus = Corpus(root)
    docs = list(corpus)
    assert docs[0] == "The board approved the new travel policy on Monday."
    assert "cafeteria reopens" in docs[1] and "SCRIPT" not in docs[1] and "MENU" not in docs[1]
    assert [f["format"] for f in corpus.manifest["files"]] == ["docx", "html"]
    assert "<p>" not in list(Corpus([root / "page.html"]))[0]
