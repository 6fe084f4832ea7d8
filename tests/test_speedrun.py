"""`daulat speedrun --preset micro`: every stage end to end, without network, resumable, reproducible."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require

from daulat.checkpoint import load_info, load_model
from daulat.report import _cell, annex_xi, missing_fields, read_metrics

pytestmark = pytest.mark.slow  # over ~10 s: left out of the fast loop (-m 'not slow')

STAGES = ["pretrain", "sft", "grpo", "distill"]


def _offline_prefix() -> list[str]:
    """The command prefix that runs a program without network: a fresh network namespace has only a
    loopback device, and it is down. As root plain `unshare --net`; otherwise inside an unprivileged
    user namespace (`--map-root-user`). [] where neither can be made here."""
    if not shutil.which("unshare"):
        return []
    for prefix in (["unshare", "--net"], ["unshare", "--net", "--map-root-user"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return []


def _command(out: Path) -> list[str]:
    return [*_offline_prefix(), sys.executable, "-m", "daulat.cli", "speedrun", "--preset", "micro", "--out", str(out)]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun") / "run"
    cmd = _command(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, cmd[: cmd.index(sys.executable)]


def test_every_stage_loads_in_transformers_and_documents_itself(first_run):
    transformers = require("transformers")
    import torch

    out, stdout, _ = first_run
    ids = torch.randint(0, 100, (1, 12))
    for stage in STAGES:
        final = out / stage / "final"
        hf = transformers.AutoModelForCausalLM.from_pretrained(final, attn_implementation="eager").eval()
        model = load_model(final)
        with torch.no_grad():
            assert (hf(ids).logits - model(ids)).abs().max() < 1e-4, stage
        card = annex_xi(model, load_info(final))
        assert missing_fields(card) == [], (stage, missing_fields(card))
        assert (final / "README.md").read_text().startswith("---\nlicense:")
    assert "daulat chat" in stdout and "daulat serve" in stdout


def test_the_speedrun_ran_without_network(first_run):
    _, _, offline_prefix = first_run
    if not offline_prefix:
        pytest.skip("no network namespace can be made here (needs unshare, and root or user namespaces)")
    # the namespace the run succeeded in has no route out
    probe = "import socket; socket.create_connection(('1.1.1.1', 443), timeout=5)"
    reach = subprocess.run([*offline_prefix, sys.executable, "-c", probe], capture_output=True, text=True)
    assert reach.returncode != 0 and "Network is unreachable" in reach.stderr, reach.stderr


def test_report_numbers_come_from_the_metrics_files(first_run):
    out, _, _ = first_run
    report = (out / "report.md").read_text()
    for stage in STAGES:
        records = read_metrics(out / stage / "metrics.jsonl")
        losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
        assert losses, stage
        row = next(line for line in report.splitlines() if line.startswith(f"| {stage} |"))
        assert f"| {_cell(losses[-1])} |" in row, (stage, row)
        evaluation = json.loads((out / "eval" / f"{stage}.json").read_text())
        assert f"| {_cell(evaluation['accuracy'])} |" in row
        for k, v in evaluation["pass@k"].items():
            assert f"| {_cell(v)} |" in row
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 2
    assert (out / "loss.png").stat().st_size > 1000


def test_a_killed_speedrun_resumes_without_redoing_stages_and_reproduces(first_run, tmp_path):
    first, _, _ = first_run
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.time() + 900
    while not (out / "sft" / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # in the middle of SFT, a stage after the pretraining
    proc.wait()
    assert (out / "pretrain" / "final").is_dir() and not (out / "distill" / "final").exists()
    pretrain_files = {p: p.stat().st_mtime_ns for p in (out / "pretrain").rglob("*") if p.is_file()}

    rerun = subprocess.run(_command(out), capture_output=True, text=True, env=env, timeout=1200)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "pretrain: done already" in rerun.stdout
    assert "daulat pretrain" not in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in pretrain_files} == pretrain_files  # nothing rewritten

    # same seed, same machine: the same final metrics as the uninterrupted first run
    for stage in STAGES:
        a = json.loads((first / "eval" / f"{stage}.json").read_text())
        b = json.loads((out / "eval" / f"{stage}.json").read_text())
        assert (a["accuracy"], a.get("pass@k")) == (b["accuracy"], b.get("pass@k")), stage
        last = [[r["loss"] for r in read_metrics(d / stage / "metrics.jsonl") if "loss" in r][-1] for d in (first, out)]
        assert last[0] == last[1], stage
