"""Early stopping: the run stops once the eval metric stops improving and keeps the best adapter."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from lorapipe import tasks
from lorapipe.config import UserError, parse_params
from lorapipe.modeling import load_config
from lorapipe.runtime import describe, resolve
from lorapipe.sections_run import best_model_metric
from lorapipe.training import training_args
from tests.test_reliability import small_params
from tests.test_training import tiny_run


class AdapterAtEachSave(TrainerCallback):
    """Each checkpoint's adapter tensors, by step (the work folder is gone after the run)."""

    def __init__(self) -> None:
        self.adapters: dict[int, dict[str, torch.Tensor]] = {}

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.adapters[state.global_step] = load_file(folder / "adapter_model.safetensors")


# Evals at steps 2, 4, 6, 8...: best at 4; 6 is worse and 8 only ties, so patience 2 ends the
# run at step 8 of 24. Were it to go on, every later eval would be a new best.
SCORES = [0.5, 0.7, 0.6, 0.7]


def stopping_run(model: Path, monkeypatch: pytest.MonkeyPatch):
    scores = itertools.chain(SCORES, itertools.repeat(0.9))
    monkeypatch.setattr(
        tasks.SeqCls, "compute_metrics", lambda self, pred: {"accuracy": next(scores)}
    )
    return small_params(
        str(model),
        epochs=2,  # 12 steps an epoch
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        early_stopping_patience=2,
    )


def test_stops_when_the_metric_stops_improving_and_keeps_the_best_adapter(
    tiny_bert, tmp_path, monkeypatch
):
    saved = AdapterAtEachSave()
    summary = tiny_run(stopping_run(tiny_bert, monkeypatch), tmp_path, [saved])

    assert (summary["global_steps"], summary["best_step"]) == (8, 4)
    adapter = load_file(tmp_path / "adapter/adapter_model.safetensors")
    assert adapter.keys() == saved.adapters[4].keys()
    assert all(torch.equal(adapter[k], saved.adapters[4][k]) for k in adapter)
    assert not all(torch.equal(adapter[k], saved.adapters[8][k]) for k in adapter)
    state = json.loads((tmp_path / "ckpt/trainer_state.json").read_text())
    assert state["global_step"] == 8  # the resumable final state is the last step's


class KilledAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_a_resumed_run_keeps_its_patience_count(tiny_bert, tmp_path, monkeypatch):
    # Killed after the step-6 checkpoint, one eval without improvement: the resumed run stops
    # at 8, as the straight run does, and still loads step 4's adapter back.
    p = stopping_run(tiny_bert, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(p, tmp_path, [KilledAfterSave(6)])
    saved = AdapterAtEachSave()
    summary = tiny_run(p, tmp_path, [saved])
    assert (summary["global_steps"], summary["best_step"], list(saved.adapters)) == (8, 4, [8])
    timing = json.loads((tmp_path / "reports/timing.json").read_text())
    assert timing["resumed_from_step"] == 6


@pytest.mark.parametrize(
    ("train", "key", "greater"),
    [
        ({"eval_strategy": "epoch"}, "eval_accuracy", True),  # auto: seq_cls's accuracy
        ({"eval_strategy": "steps", "early_stopping_metric": "loss"}, "eval_loss", False),
        ({"eval_strategy": "epoch", "early_stopping_metric": "eval_loss"}, "eval_loss", False),
        (
            {"eval_strategy": "steps", "early_stopping_metric": "eval_accuracy"},
            "eval_accuracy",
            True,
        ),
    ],
)
def test_training_arguments_load_the_best_by_the_metric(tiny_bert, tmp_path, train, key, greater):
    p = small_params(str(tiny_bert), early_stopping_patience=1, save_steps=100, **train)
    args = training_args(p, tmp_path, True, resolve(p, load_config(p), describe("cpu")))
    assert (args.metric_for_best_model, args.greater_is_better) == (key, greater)
    assert args.load_best_model_at_end
    assert args.save_strategy == args.eval_strategy == train["eval_strategy"]


def test_off_by_default_saves_every_save_steps(tiny_bert, tmp_path):
    p = small_params(str(tiny_bert))
    args = training_args(p, tmp_path, True, resolve(p, load_config(p), describe("cpu")))
    assert (args.load_best_model_at_end, args.save_strategy, args.save_steps) == (False, "steps", 4)
    with_stop = small_params(str(tiny_bert), early_stopping_patience=1)
    with pytest.raises(UserError, match=r"^train\.early_stopping_patience: .* no eval split$"):
        training_args(with_stop, tmp_path, False, resolve(p, load_config(p), describe("cpu")))


def test_causal_tasks_stop_on_eval_loss():
    assert best_model_metric("causal_lm", "auto") == "eval_loss"
    assert best_model_metric("sft", "perplexity") == "eval_loss"  # exp(loss): the same order
    assert best_model_metric("sft", "accuracy") is None


@pytest.mark.parametrize(
    ("task", "train", "line"),
    [
        (
            "seq_cls",
            {"early_stopping_patience": 2, "eval_strategy": "no"},
            "train.early_stopping_patience: needs evals, but train.eval_strategy is no",
        ),
        (
            "seq_cls",
            {"early_stopping_patience": 0},
            "train.early_stopping_patience: Input should be greater than 0 (got 0)",
        ),
        (
            "seq_cls",
            {"early_stopping_metric": "accurcy"},
            "train.early_stopping_metric: 'accurcy' is not in seq_cls's in-training eval "
            "(it logs eval_accuracy, eval_loss)",
        ),
        (
            "causal_lm",
            {"early_stopping_metric": "eval_accuracy"},
            "train.early_stopping_metric: 'eval_accuracy' is not in causal_lm's in-training eval "
            "(it logs eval_loss)",
        ),
        (
            "seq_cls",
            {"early_stopping_patience": 2, "eval_strategy": "steps", "eval_steps": 50},
            "train.save_steps: must equal train.eval_steps for early stopping",
        ),
    ],
)
def test_bad_early_stopping_params_are_one_line_naming_the_param(task, train, line):
    raw = small_params("unused").model_dump()
    raw["task"] = task
    raw["train"].update(train)
    with pytest.raises(UserError) as err:
        parse_params(raw)  # the params check, before any stage loads a model
    assert str(err.value) == f"params.yaml: {line}"
