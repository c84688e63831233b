"""Progress a person can follow: lines in logs, a bar in a terminal, one summary per stage."""

import os
import pty
import re
import subprocess
import sys

import pytest

from lorapipe.progress import clock, step_line, summary
from tests.conftest import ROOT, dvc, make_project

SUMMARY = re.compile(
    r"^(tokenize|train|evaluate|merge|plot): wrote (\S+)(, \S+)* \| .+ \| \d+\.\d s$"
)
STEP = re.compile(
    r"^step (\d+)/12 \(\d+%\) \| loss \d\.\d+ \| grad_norm [\d.e-]+ \| learning_rate [\d.e-]+ "
    r"\| epoch [\d.]+ \| \d+:\d\d elapsed(, ~\d+:\d\d left)?$"
)
BAR_BITS = ("\r", "it/s", "s/it", "%|", "elapsed", "loss=")


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert):
    overrides = {
        "model.name": str(tiny_bert),
        "data.max_train_rows": 48,
        "data.max_eval_rows": 16,
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.logging_steps": 2,
        "train.save_steps": 6,
    }
    path = make_project(tmp_path_factory.mktemp("progress"), overrides)
    return path, dvc("repro", cwd=path)


def test_each_stage_ends_with_one_summary_line(project):
    _, proc = project
    lines = [line for line in proc.stdout.splitlines() if SUMMARY.match(line)]
    assert [SUMMARY.match(line)[1] for line in lines] == [
        "tokenize",
        "train",
        "evaluate",
        "merge",
        "plot",
    ], proc.stdout
    assert re.search(r"^tokenize: .* 48 train \+ 16 eval rows, \d+ tokens, \d+ rows/s ", lines[0])
    assert re.search(r"^evaluate: .*\| accuracy [\d.]+ \(base [\d.]+, [+-][\d.e-]+\) \|", lines[2])


def test_training_logs_one_line_per_logging_step_without_a_terminal(project):
    _, proc = project
    log = proc.stdout + proc.stderr
    steps = [int(m[1]) for m in map(STEP.match, proc.stdout.splitlines()) if m]
    assert steps == [2, 4, 6, 8, 10, 12], proc.stdout  # 48 rows / 8 × 2 epochs, every 2 steps
    assert "~" in proc.stdout and " left" in proc.stdout  # time left, until the last step
    assert re.search(r"^merge 4/4: verifying the saved model \(at \d+:\d\d\)$", proc.stdout, re.M)
    assert not any(bit in log for bit in ("\r", "it/s", "s/it", "%|")), log  # no bars


def test_a_terminal_gets_a_bar_and_no_bar_reaches_a_file(project):
    path, _ = project
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LORAPIPE_PROGRESS": "bars"}
    proc = subprocess.run(
        [sys.executable, "stages/train.py"], cwd=path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\d+/12 \[[\d:]+<[\d:]+, +[\d.]+(it/s|s/it), loss=\d\.\d{4}\]", proc.stderr)
    assert not any(STEP.match(line) for line in proc.stdout.splitlines())
    written = [*(path / "reports").rglob("*"), *(path / "models").rglob("*.json")]
    for file in (f for f in written if f.is_file() and f.suffix in (".json", ".tsv", ".md")):
        text = file.read_text()
        assert not any(bit in text for bit in BAR_BITS), file


@pytest.mark.parametrize("terminal", [True, False])
def test_bars_follow_whether_stderr_is_a_terminal(terminal):
    code = "from lorapipe.progress import interactive; print(interactive())"
    env = {k: v for k, v in os.environ.items() if k != "LORAPIPE_PROGRESS"}
    env["PYTHONPATH"] = str(ROOT / "src")
    primary, secondary = pty.openpty()
    stderr = secondary if terminal else subprocess.PIPE
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    os.close(primary)
    os.close(secondary)
    assert proc.stdout.strip() == str(terminal)


def test_line_formats():
    logs = {"loss": 0.69314, "learning_rate": 1e-3, "epoch": 0.5, "train_runtime": 3.0}
    assert step_line(10, 40, logs, elapsed=75.0, done=10) == (
        "step 10/40 (25%) | loss 0.6931 | learning_rate 0.001 | epoch 0.5 | 1:15 elapsed, "
        "~3:45 left"
    )
    assert step_line(40, 40, {"eval_loss": 0.5}) == "step 40/40 (100%) | eval_loss 0.5"
    assert clock(3725) == "1:02:05"
    assert summary("plot", ["reports/figures"], "2 figures", 3.21) == (
        "plot: wrote reports/figures | 2 figures | 3.2 s"
    )
