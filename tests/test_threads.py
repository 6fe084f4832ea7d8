"""--threads / train.threads: a number, or `auto` (the cores nobody else is using)."""

import pytest

from daulat.errors import DaulatError
from daulat.threads import auto_threads, resolve_threads, set_threads


def test_auto_counts_the_cores_not_busy_and_never_goes_below_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert auto_threads(load=0.1, cpus=2) == 2  # idle: both cores (1.6x faster than one, measured)
    assert auto_threads(load=0.9, cpus=2) == 1
    assert auto_threads(load=9.5, cpus=2) == 1  # busy: one thread (2 threads measured 3-10x slower)
    assert auto_threads(load=2.4, cpus=16) == 14


def test_auto_follows_omp_num_threads_when_it_is_set(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads() == 3 and resolve_threads("auto") == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")  # not a number: ignored, the load decides
    assert 1 <= auto_threads() <= 64


def test_threads_values_are_checked():
    assert resolve_threads(2) == 2 and resolve_threads("4") == 4 and resolve_threads(None) is None
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(DaulatError, match="threads must be a whole number"):
            resolve_threads(bad)


def test_set_threads_sets_torch():
    import torch

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_every_stage_takes_threads_as_a_flag_and_as_config(capsys):
    from daulat.cli import main

    assert main(["sft", "--init", "x", "--out", "y", "--threads", "2", "--print-config"]) == 0
    assert "threads = 2" in capsys.readouterr().out
    assert main(["pretrain", "--out", "y", "--print-config"]) == 0
    assert 'threads = "auto"' in capsys.readouterr().out
    assert main(["pretrain", "--out", "y", "--print-config", "train.threads=0"]) != 0
    assert "'threads' = 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--out", "y", "--threads", "none"])
    assert "--threads" in capsys.readouterr().err
