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
from daulat.report import STAGE_TITLES, annex_xi, fmt_fraction, fmt_number, missing_fields, read_metrics, verdict
from daulat.speedrun import STAGES

pytestmark = pytest.mark.slow  # over ~10 s: left out of the fast loop (-m 'not slow')


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
    # the namespace the run succeeded in has no network at all: even its loopback device is down
    probe = "import socket; socket.create_connection(('127.0.0.1', 9), timeout=5)"
    reach = subprocess.run([*offline_prefix, sys.executable, "-c", probe], capture_output=True, text=True)
    assert reach.returncode != 0 and "Network is unreachable" in reach.stderr, reach.stderr


def _evaluations(out: Path) -> dict:
    return {stage: json.loads((out / "eval" / f"{stage}.json").read_text()) for stage in STAGES}


def test_report_numbers_come_from_the_metrics_and_eval_files(first_run):
    out, _, _ = first_run
    report = (out / "report.md").read_text()
    evaluations = _evaluations(out)
    for stage in STAGES:
        records = read_metrics(out / stage / "metrics.jsonl")
        losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
        assert losses, stage
        row = next(line for line in report.splitlines() if line.startswith(f"| {STAGE_TITLES[stage]} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        evaluation = evaluations[stage]
        lo, hi = evaluation["accuracy_ci95"]
        assert lo <= evaluation["accuracy"] <= hi and evaluation["correct"] == round(evaluation["accuracy"] * 20)
        k = max(evaluation["pass@k"], key=int)
        assert cells[5:] == [fmt_number(losses[-1]), fmt_fraction(evaluation["accuracy"]), f"{lo:.3f}–{hi:.3f}",
                             fmt_fraction(evaluation["pass@k"]["1"]), f"{fmt_fraction(evaluation['pass@k'][k])} (k={k})"], row
        # the checkpoint's own card carries the same evaluation
        card = (out / stage / "final" / "README.md").read_text()
        assert f"| greedy accuracy | {fmt_fraction(evaluation['accuracy'])} |" in card, stage
        assert load_info(out / stage / "final")["evaluation"]["accuracy"] == evaluation["accuracy"]
    assert "(20 held-out problems;" in report  # micro's eval_problems
    assert verdict(evaluations)[1] in report and report.count("Distillation against direct training") == 1
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 2
    assert (out / "loss.png").stat().st_size > 1000 and (out / "accuracy.png").stat().st_size > 1000


def test_the_student_trained_directly_had_no_teacher_and_the_same_budget(first_run):
    out, _, _ = first_run
    direct, distilled = (load_info(out / name / "final") for name in ("student-direct", "distill"))
    assert "teacher" not in direct and distilled["teacher"]["parameters"]  # the distilled one had a teacher
    assert [h["stage"] for h in direct["history"]] == ["init"]  # a fresh student, nothing before it
    assert "no teacher" in direct["history"][0]["method"] and direct["stage"] == "sft"
    assert direct["data"]["task"] == "addition"
    for key in ("steps", "batch_size", "seq_len", "lr", "schedule", "warmup_steps"):
        assert direct["config"]["train"][key] == distilled["config"]["train"][key], key
    assert direct["parameters"] == distilled["parameters"]
    evaluation = json.loads((out / "eval" / "student-direct.json").read_text())
    assert {"accuracy", "pass@k"} <= set(evaluation) and evaluation["task"] == "addition"


def test_a_rerun_with_other_settings_is_refused_and_evaluations_follow_the_task(first_run, tmp_path):
    from daulat.generation import Sampling
    from daulat.speedrun import SpeedrunConfig, evaluate_stage

    out = tmp_path / "run"
    shutil.copytree(first_run[0], out)
    before = {p: p.read_bytes() for p in (out / "eval").iterdir()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rerun = subprocess.run([*_command(out), "speedrun.task=comparison"], capture_output=True, text=True, env=env,
                           timeout=600)
    assert rerun.returncode == 2, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    error = rerun.stderr.strip().splitlines()
    # the built-in corpus leans towards the run's task, so even pretraining is another run now
    assert len(error) == 1 and "pretrain was run with other settings" in error[0], error
    assert 'builtin_task = "comparison"' in error[0] and "done already" not in rerun.stdout, error
    assert {p: p.read_bytes() for p in (out / "eval").iterdir()} == before  # no report, no evaluation rewritten

    # a cached evaluation is reused only for the same task, settings and weights
    file = out / "eval" / "sft.json"
    small = SpeedrunConfig(task="comparison", eval_problems=4, eval_samples=1, eval_sampling=Sampling(max_tokens=8))
    result = evaluate_stage(out / "sft" / "final", small, 0, file)
    assert (result["task"], result["problems"]) == ("comparison", 4)
    assert json.loads(file.read_text())["task"] == "comparison"
    stamp = file.stat().st_mtime_ns
    assert evaluate_stage(out / "sft" / "final", small, 0, file) == result and file.stat().st_mtime_ns == stamp


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
    # nothing of the finished stage retrained or rewritten, except that its card gains the evaluation
    carded = {out / "pretrain" / "final" / name for name in ("README.md", "daulat.json")}
    assert {p: p.stat().st_mtime_ns for p in pretrain_files if p not in carded} == \
        {p: t for p, t in pretrain_files.items() if p not in carded}
    assert "## Evaluation" in (out / "pretrain" / "final" / "README.md").read_text()

    # same seed, same machine: the same final metrics as the uninterrupted first run
    for stage in STAGES:
        a = json.loads((first / "eval" / f"{stage}.json").read_text())
        b = json.loads((out / "eval" / f"{stage}.json").read_text())
        assert (a["accuracy"], a.get("pass@k")) == (b["accuracy"], b.get("pass@k")), stage
        last = [[r["loss"] for r in read_metrics(d / stage / "metrics.jsonl") if "loss" in r][-1] for d in (first, out)]
        assert last[0] == last[1], stage


def test_wilson_interval_matches_scipy():
    from scipy import stats

    from daulat.report import wilson_interval

    for k, n in ((0, 20), (12, 20), (180, 300), (300, 300), (1, 7)):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=2e-4), (k, n)
