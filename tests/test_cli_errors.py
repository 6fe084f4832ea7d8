"""The CLI's error contract, through the real command line: every error it can foresee is one line and exit
code 2 (nothing half-made left behind), an unforeseen one is reported as a bug (exit 1, traceback with
--debug), and output into a closed pipe ends quietly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daulat.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def daulat(*argv, cwd, **kwargs):
    return subprocess.run([sys.executable, "-m", "daulat.cli", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=300, **kwargs)


def one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "m"
    assert main(["init", "--preset", "micro", "--out", str(out)]) == 0
    return out


def in_process(capsys, *argv):
    """main(argv) in this process (no interpreter start-up per case): (exit code, stderr lines)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(code, lines, *words):
    assert code == 2 and len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_pretrain_on_a_pdf_is_refused_before_creating_the_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.pdf").write_bytes(b"%PDF-1.7\n%\xb5\xb5\xb5\xb5\n1 0 obj\n<</Type/Catalog>>\nendobj\n\x00\x00xref")
    # not a PDF at all (a PDF header, then junk): the extractor fails, and that is known before anything is made
    assert_one_line(*in_process(capsys, "pretrain", "--data", "file.pdf", "--out", "runs/pt"), "file.pdf",
                    "no readable corpus files", "extractor_failed (pdf)")
    (tmp_path / "blob.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00" * 100)
    assert_one_line(*in_process(capsys, "pretrain", "--data", "blob.bin", "--out", "runs/pt"), "blob.bin", "1 binary")
    assert not (tmp_path / "runs").exists()


def test_wrongly_typed_override_is_said_in_words(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = assert_one_line(*in_process(capsys, "pretrain", "--out", "x", "train.lr=abc"), "train.lr", "'abc'", "a number")
    assert "<class" not in line
    assert_one_line(*in_process(capsys, "pretrain", "--out", "x", "data.max_document_bytes=big"), "an integer")
    assert not (tmp_path / "x").exists()


def test_a_missing_path_does_not_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line(*in_process(capsys, "tokenizer", "--data", "no/such/folder", "--out", "tok"), "no/such/folder", "does not exist")
    assert_one_line(*in_process(capsys, "pretrain", "--out", "x", "--config", "missing.toml"), "missing.toml", "does not exist")
    assert not (tmp_path / "tok").exists() and not (tmp_path / "x").exists()


@pytest.mark.slow  # starts an interpreter that loads torch: seconds, more on a loaded machine
def test_card_into_a_closed_pipe_ends_quietly(checkpoint, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "daulat.cli", "card", str(checkpoint), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=ENV)
    proc.stdout.close()  # the reader is gone before the first byte is written, as `| head` may be
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and stderr == ""


@pytest.mark.slow  # starts an interpreter that loads torch: seconds, more on a loaded machine
def test_a_full_disk_is_one_line(checkpoint, tmp_path):
    with open("/dev/full", "w") as full:  # every write to /dev/full fails with ENOSPC
        proc = subprocess.run([sys.executable, "-m", "daulat.cli", "card", str(checkpoint), "--json"],
                              stdout=full, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV, timeout=300)
    one_line_error(proc, "no space left")


def test_an_unforeseen_error_is_reported_as_a_bug(monkeypatch, capsys, tmp_path):
    import daulat.tokenizer

    def broken(args):
        return {}["a key daulat forgot"]  # a real bug: a KeyError inside a command

    monkeypatch.setattr(daulat.tokenizer, "run", broken)
    assert main(["tokenizer", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bug in daulat" in err[0] and "KeyError" in err[0] and "a key daulat forgot" in err[0]
    with pytest.raises(KeyError):
        main(["tokenizer", "--out", str(tmp_path), "--debug"])


def test_describe_words_operating_system_errors():
    from daulat.errors import describe

    with pytest.raises(OSError) as e:
        open("/no/such/file")
    assert describe(e.value) == "/no/such/file: does not exist"
    assert describe(MemoryError()).startswith("out of memory")
    assert describe(ValueError("two\nlines")) == "two lines"
