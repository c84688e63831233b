"""What a stage says and leaves when its input is odd or it fails: dropped and rare rows
counted aloud, output free of library noise, refusals before a model loads, a failed or
interrupted stage keeping the committed reports."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorapipe.data import tokenize
from tests.conftest import ROOT, dvc, make_project, set_params
from tests.test_bad_input import error_lines, light_run, params_with, write_params


def _tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return str(path)


def tokenize_tsv(model, folder, train, evaluation=None):
    """The tokenize stage's library call on (text, label) rows written as TSV files."""
    eval_file = _tsv(folder / "e.tsv", evaluation) if evaluation else None
    p = params_with(model, **{"data.train": _tsv(folder / "t.tsv", train), "data.eval": eval_file})
    return tokenize(p, folder / "tokenized")


def test_blank_texts_are_dropped_and_counted(tiny_bert, tmp_path, caplog):
    train = [("good film", 1), ("  ", 0), ("bad film", 0), (" ", 1)]
    train += [(f"row {i}", i % 2) for i in range(20)]
    evaluation = [("good film", 1), ("new one", 0), ("   ", 1), ("another", 1)]
    with caplog.at_level(logging.INFO, logger="lorapipe"):
        meta = tokenize_tsv(tiny_bert, tmp_path, train, evaluation)
    assert meta["dropped_blank_rows"] == {"train": 2, "eval": 1}
    assert meta["rows"] == {"train": 22, "eval": 3}
    assert json.loads((tmp_path / "tokenized/meta.json").read_text())["dropped_blank_rows"] == {
        "train": 2,
        "eval": 1,
    }
    log = caplog.text
    assert "data.train: dropped 2 of 24 rows whose 'sentence' is blank (first: line 3)" in log
    assert "data.eval: dropped 1 of 4 rows whose 'sentence' is blank (first: line 4)" in log
    # Leakage: "good film" is in both.
    assert meta["eval_rows_in_train"] == 1
    assert "1 of 3 eval rows also appear verbatim in data.train" in log
    assert meta["labels"] == {"train": {"0": 11, "1": 11}, "eval": {"0": 1, "1": 2}}
    assert "data.train labels: 0: 11 (50.0 %), 1: 11 (50.0 %)" in log


def test_a_missing_or_rare_class_is_a_loud_warning(tiny_bert, tmp_path, caplog):
    train = [(f"row {i}", 1) for i in range(150)] + [("the only zero", 0)]
    evaluation = [(f"eval {i}", 1) for i in range(5)]
    with caplog.at_level(logging.INFO, logger="lorapipe"):
        meta = tokenize_tsv(tiny_bert, tmp_path, train, evaluation)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "data.train: label 0 has 1 of 151 rows (under 1 %)",
        "data.eval: label 0 has no rows of 5: eval cannot score it",
    ]
    assert meta["labels"]["train"] == {"0": 1, "1": 150}
    assert meta["eval_rows_in_train"] == 0


def test_single_label_training_set_warns_that_it_cannot_learn(tiny_bert, tmp_path, caplog):
    train = [(f"row {i}", 1) for i in range(10)]
    with caplog.at_level(logging.INFO, logger="lorapipe"):
        tokenize_tsv(tiny_bert, tmp_path, train)
    assert "data.train: label 0 has no rows of 9: the model cannot learn it" in caplog.text


def test_tokenize_stage_output_is_free_of_library_noise(tiny_bert, tmp_path):
    train = [(f"row {i}", i % 2) for i in range(20)] + [("  ", 1)]
    write_params(
        tmp_path,
        **{
            "model.name": str(tiny_bert),
            "data.train": _tsv(tmp_path / "t.tsv", train),
            "data.eval": _tsv(tmp_path / "e.tsv", [("fine", 1), ("poor", 0)]),
        },
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages/tokenize_data.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "data.train: dropped 1 of 21 rows whose 'sentence' is blank (first: line 22)" in out
    assert "data.train labels: 0: " in out and "data.eval labels: " in out
    for noise in ("gemm_4bit", "Warning", "Saving the dataset", "Traceback"):
        assert noise not in out, out


@pytest.mark.parametrize(
    ("argv", "adapter", "message"),
    [
        (["in.txt"], False, "error: --adapter: models/adapter holds no trained adapter"),
        (["in.txt", "--model", "models/nope"], False, "error: --model: models/nope does not exist"),
        (["in.txt", "--model", "data"], False, "error: --model: data is not a model folder"),
        (["missing.txt"], True, "error: input: file not found: missing.txt"),
        (["data"], True, "error: input: data is a directory"),
    ],
)
def test_predict_refuses_before_any_model_loads(tmp_path, argv, adapter, message):
    write_params(tmp_path)
    (tmp_path / "in.txt").write_text("a fine film\n")
    (tmp_path / "data").mkdir()
    if adapter:  # an adapter folder is there: the input is checked before it loads
        (tmp_path / "models/adapter").mkdir(parents=True)
        (tmp_path / "models/adapter/adapter_config.json").write_text("{}")
    proc, _ = light_run(tmp_path, "lorapipe", "predict", *argv)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert proc.stdout.strip() == "imported:"


@pytest.mark.parametrize(
    ("command", "task", "kind", "message"),
    [
        ("predict", "seq_cls", "LlamaForCausalLM", "predict needs a *ForSequenceClassification"),
        ("generate", "causal_lm", "BertForSequenceClassification", "generate needs a *ForCausalLM"),
    ],
)
def test_a_model_of_the_wrong_kind_is_refused_before_it_loads(
    tmp_path, command, task, kind, message
):
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["task"] = task
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "in.txt").write_text("a fine film\n")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged/config.json").write_text(json.dumps({"architectures": [kind]}))
    proc, _ = light_run(tmp_path, "lorapipe", command, "in.txt", "--model", "merged")
    assert proc.returncode == 2
    assert error_lines(proc) == [f"error: --model: merged is a {kind}; {message} model"]
    assert proc.stdout.strip() == "imported:"


def test_a_model_dependent_check_loads_neither_peft_nor_bitsandbytes(tmp_path):
    # peft (and the bitsandbytes it imports) take most of the seconds such an error costs.
    write_params(tmp_path, **{"lora.target_modules": ["q_proj"]})
    shutil.copytree(ROOT / "data/raw", tmp_path / "data/raw")
    proc, _ = light_run(tmp_path, "lorapipe", "check")
    assert proc.returncode == 2
    assert error_lines(proc)[-1].startswith("error: lora.target_modules: q_proj match no layer")
    imported = proc.stdout.split("imported:")[-1].split()
    assert "torch" in imported  # the meta model was built
    assert "peft" not in imported and "bitsandbytes" not in imported, imported


def test_make_works_in_a_path_with_a_space(tmp_path):
    project = tmp_path / "my projects" / "lorapipe"
    bin_dir = project / ".venv/bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(ROOT / "Makefile", project)
    (project / "pyproject.toml").write_text("")
    for tool in ("dvc", "python", "lorapipe"):  # stand-ins: what make runs, with the PATH it gets
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $* (PATH=$PATH)"\n')
        (bin_dir / tool).chmod(0o755)
    (project / ".venv/.installed").touch()  # newer than pyproject.toml: no install
    for target, ran in (("repro", "dvc repro"), ("test-fast", "python -m pytest")):
        proc = subprocess.run(["make", target], cwd=project, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert f"{ran}" in proc.stdout and f"(PATH={bin_dir}:" in proc.stdout, proc.stdout


FAILING_STAGE = """
import sys
from pathlib import Path

from lorapipe import stage


def main(p):
    live = Path("reports/train/plots/metrics")
    live.mkdir(parents=True, exist_ok=True)
    (live / "loss.tsv").write_text("step\\tloss\\n0\\t0.7\\n")  # a partial curve
    (live / "grad_norm.tsv").write_text("step\\tgrad_norm\\n")
    raise {error}


stage.run(main, tracked_outs=["reports/train"], interrupted="kept; resume it")
"""


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        ("KeyboardInterrupt", 130, "interrupted: kept; resume it"),
        ("stage.UserError('train: loss became nan')", 2, "error: train: loss became nan"),
        ("RuntimeError('a bug')", 1, None),
    ],
)
def test_a_failed_stage_leaves_the_committed_reports(tmp_path, error, code, line):
    write_params(tmp_path)
    reports = tmp_path / "reports/train"
    (reports / "plots/metrics").mkdir(parents=True)
    (reports / "metrics.json").write_text('{"loss": 0.3}\n')
    (reports / "plots/metrics/loss.tsv").write_text("step\tloss\n0\t0.7\n10\t0.3\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "reports"], cwd=tmp_path, check=True)
    shutil.rmtree(reports)  # what DVC does to a stage's outs before it runs the command
    (tmp_path / "stage.py").write_text(FAILING_STAGE.format(error=error))
    proc = subprocess.run(
        [sys.executable, "stage.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == code, proc.stderr
    if line:
        assert proc.stderr.splitlines() == [line]
    assert (reports / "metrics.json").read_text() == '{"loss": 0.3}\n'
    assert (reports / "plots/metrics/loss.tsv").read_text() == "step\tloss\n0\t0.7\n10\t0.3\n"
    assert not (reports / "plots/metrics/grad_norm.tsv").exists()  # the failed run's partial log


def saved_past_step(project: Path, step: int) -> bool:
    steps = [int(c.name.split("-")[1]) for c in project.glob("models/.work/*/checkpoint-*")]
    return any(s >= step for s in steps)


@pytest.mark.slow
def test_ctrl_c_in_dvc_repro_is_one_line_and_keeps_the_reports(tiny_bert, tmp_path):
    small = {"data.max_train_rows": 64, "data.max_eval_rows": 32, "train.eval_strategy": "no"}
    train = {"train.epochs": 1, "train.batch_size": 4, "train.save_steps": 2}
    project = make_project(tmp_path, {"model.name": str(tiny_bert), **small, **train})
    dvc("repro", "train", cwd=project)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "reports"], cwd=project, check=True)
    # 50,000 steps: far more than a fast machine runs before the interrupt below.
    set_params(project, {"data.max_train_rows": None, "train.batch_size": 2, "train.epochs": 20})
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "train"],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # As in a terminal: a job started in the background of a script ignores SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    # Any checkpoint past the first: save_total_limit deletes each one a few steps later.
    while time.time() < deadline and proc.poll() is None and not saved_past_step(project, 4):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground group
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert "interrupted: the newest complete checkpoint in models/.work/ is kept; run `dvc " in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    status = subprocess.run(
        ["git", "status", "--porcelain", "reports"], cwd=project, capture_output=True, text=True
    )
    assert status.stdout == ""  # the committed reports, as they were before the run


def test_transformers_load_report_is_kept_out_of_stage_output(tiny_bert, tmp_path):
    # MiniLM ships no classifier: transformers reports the new head as MISSING on every load.
    from transformers import AutoModel, AutoTokenizer

    headless = tmp_path / "headless"
    AutoModel.from_pretrained(tiny_bert).save_pretrained(headless)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(headless)
    code = (
        "import sys\n"
        "from lorapipe.stage import quiet_libraries\n"
        "quiet_libraries()\n"
        "from transformers import AutoModelForSequenceClassification\n"
        "AutoModelForSequenceClassification.from_pretrained(sys.argv[1])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(headless)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 0, proc.stderr
    assert "MISSING" not in proc.stderr and "newly initialized" not in proc.stderr, proc.stderr
