"""The real pipeline end to end (dvc repro on a copy), and DVC's selective reruns."""

import json
import re

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from tests.conftest import MINILM, dvc, make_project, set_params

SLICE = {
    "model.name": MINILM,
    "data.max_train_rows": 800,
    "data.max_eval_rows": 200,
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.save_steps": 50,
    "train.logging_steps": 10,
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    path = make_project(tmp_path_factory.mktemp("pipeline"), SLICE)
    dvc("repro", cwd=path)
    return path


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def changed(project) -> set[str]:
    return set(json.loads(dvc("status", "--json", cwd=project).stdout))


def test_minilm_learns_reloads_and_merges(project):
    metrics = json.loads((project / "reports/eval.json").read_text())
    assert metrics["accuracy"] > 0.65, metrics  # chance is 0.5
    assert metrics["tuned"]["examples"] == 200
    merge = json.loads((project / "reports/merge.json").read_text())
    assert merge["passed"] and merge["max_abs_logit_diff"] <= 1e-4
    adapter = project / "models/adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {
        p.name for p in adapter.iterdir()
    }
    from lorapipe.model_sources import resolve_model

    base = AutoModelForSequenceClassification.from_pretrained(resolve_model(MINILM), num_labels=2)
    reloaded = PeftModel.from_pretrained(base, adapter)
    merged = AutoModelForSequenceClassification.from_pretrained(project / "models/merged")
    ids = torch.tensor([[101, 2023, 3185, 2003, 2307, 102]])
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=0
        )
    checkpoint = project / "models/checkpoint"
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert sorted(p.name for p in (project / "reports/figures").iterdir()) == [
        "eval_per_epoch.png",
        "loss_lr.png",
    ]
    steps = (project / "reports/train/plots/metrics/learning_rate.tsv").read_text().splitlines()
    assert len(steps) > 10  # one row per logging step


def test_noop_repro_reruns_nothing(project):
    assert changed(project) == set()
    assert ran(dvc("repro", cwd=project).stdout) == set()


def test_eval_param_reruns_only_evaluate(project):
    # num_samples: evaluate's alone (merge reads batch_size, scoring the merged model as evaluate)
    set_params(project, {"evaluate.num_samples": 2})
    assert changed(project) == {"evaluate"}
    assert ran(dvc("repro", cwd=project).stdout) == {"evaluate"}


def test_lora_rank_reruns_from_train_not_tokenize(project):
    set_params(project, {"lora.r": 4})
    assert changed(project) == {"train"}  # evaluate, merge, plot follow through models/adapter
    dry = dvc("repro", "--dry", cwd=project).stdout
    assert "tokenize" not in ran(dry) and "train" in ran(dry)
    set_params(project, {"lora.r": 8})
    assert changed(project) == set()


def test_max_length_reruns_everything(project):
    set_params(project, {"tokenize.max_length": 64})
    assert changed(project) == {"tokenize", "train", "evaluate", "merge"}
    set_params(project, {"tokenize.max_length": 128})
    assert changed(project) == set()
