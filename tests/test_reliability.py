"""Nothing is lost: a seed reproduces, a killed run resumes, a NaN stops at once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from lorapipe.callbacks import NonFiniteLoss
from lorapipe.config import UserError, parse_params
from lorapipe.evaluation import evaluate
from lorapipe.pipeline import run_all
from lorapipe.training import latest_checkpoint
from tests.conftest import MINILM, ROOT, make_project

REPORTS = ["eval.json", "merge.json", "train/metrics.json"]


def small_params(model: str, **train):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["name"] = model
    raw["data"].update(max_train_rows=96, max_eval_rows=48)
    defaults = {"epochs": 1, "batch_size": 8, "logging_steps": 2, "save_steps": 4}
    raw["train"].update({**defaults, **train})
    return parse_params(raw)


def test_same_seed_gives_identical_metrics(tiny_bert, tmp_path):
    p = small_params(str(tiny_bert))
    run_all(p, tmp_path / "a")
    run_all(p, tmp_path / "b")
    for name in REPORTS:
        a = (tmp_path / "a/reports" / name).read_text()
        assert a == (tmp_path / "b/reports" / name).read_text(), name


def test_base_metric_is_the_seeded_step_0_model(tiny_bert, tmp_path):
    # A new classifier head is drawn when the base loads: evaluate seeds it as train does, so
    # "base" does not depend on what the process did before (a dvc stage is a fresh process).
    headless = tmp_path / "headless"  # a checkpoint without a classifier, as MiniLM's
    AutoModel.from_pretrained(tiny_bert).save_pretrained(headless)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(headless)
    p = small_params(str(headless))
    run_all(p, tmp_path)
    bases = []
    for other_seed in (1, 2):
        torch.manual_seed(other_seed)
        out = tmp_path / f"eval-{other_seed}.json"
        bases.append(
            evaluate(p, tmp_path / "tokenized", tmp_path / "adapter", out, tmp_path / "s")["base"]
        )
    assert bases[0] == bases[1]


def test_nan_loss_stops_at_once_naming_the_step(tiny_bert, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan-model")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "nan-model")
    with pytest.raises(NonFiniteLoss, match=r"loss became nan or inf at step 1; .*learning_rate"):
        run_all(small_params(str(tmp_path / "nan-model")), tmp_path / "run")
    assert not (tmp_path / "run/adapter").exists()  # nothing half-written


def test_incomplete_checkpoint_is_skipped(tmp_path):
    good, bad = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    for folder in (good, bad):
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        for name in ("optimizer.pt", "scheduler.pt"):
            (folder / name).write_bytes(b"x")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, good / "adapter_model.safetensors")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00\x01")  # killed mid-write
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        assert latest_checkpoint(tmp_path) == good


def test_bad_target_module_lists_the_real_ones(tiny_bert, tmp_path):
    raw = small_params(str(tiny_bert)).model_dump()
    raw["lora"]["target_modules"] = ["q_proj"]
    with pytest.raises(UserError, match=r"q_proj match no layer of the model; .*query.*value"):
        run_all(parse_params(raw), tmp_path)
    assert not any(tmp_path.iterdir())


def _run_stage(project: Path, script: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(
        [sys.executable, script],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_to_the_same_metrics(tmp_path):
    overrides = {
        "model.name": MINILM,
        "data.max_train_rows": 240,
        "data.max_eval_rows": 64,
        "train.epochs": 1,
        "train.batch_size": 8,
        "train.save_steps": 10,
        "train.logging_steps": 5,
        "train.eval_strategy": "no",
    }
    runs = {}
    for name in ("straight", "killed"):
        project = make_project(tmp_path / name, overrides)
        assert _run_stage(project, "stages/tokenize_data.py").wait() == 0
        runs[name] = project
    assert _run_stage(runs["straight"], "stages/train.py").wait() == 0

    proc = _run_stage(runs["killed"], "stages/train.py")
    work = runs["killed"] / "models/.work"
    deadline = time.time() + 300
    # The first complete checkpoint (step 10) leaves 20 steps in which to kill the run.
    while time.time() < deadline and not list(work.glob("*/checkpoint-*/trainer_state.json")):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # mid-epoch: 30 steps in the epoch
    proc.wait()
    assert not (runs["killed"] / "models/adapter").exists()
    assert _run_stage(runs["killed"], "stages/train.py").wait() == 0

    timing = yaml.safe_load((runs["killed"] / "reports/train/timing.json").read_text())
    assert timing["resumed_from_step"] >= 10
    for name in ("metrics.json", "plots/metrics/loss.tsv", "plots/metrics/learning_rate.tsv"):
        straight = (runs["straight"] / "reports/train" / name).read_text()
        resumed = (runs["killed"] / "reports/train" / name).read_text()
        if name.endswith(".json"):  # key order follows logging order, which a replay changes
            straight, resumed = json.loads(straight), json.loads(resumed)
        assert resumed == straight, name
