"""Reported figures: in-training accuracy, the card's LoRA scaling, the effective batch."""

import json

import datasets
import numpy as np
import pytest
import yaml
from transformers import AutoTokenizer, EvalPrediction, TrainingArguments

from lorapipe.card import model_card
from lorapipe.config import stage_params
from lorapipe.tasks import get_task
from lorapipe.training import TRAIN_KEYS, train
from tests.test_reliability import small_params


def test_in_training_accuracy_counts_argmax_equal_to_label():
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 1.0], [5.0, 4.0], [-2.0, 2.0]])
    labels = np.array([1, 0, 0, 1, 1])  # argmax 1, 0, 1, 0, 1: rows 0, 1 and 4 right
    pred = EvalPrediction(predictions=logits, label_ids=labels)
    assert get_task("seq_cls").compute_metrics(pred) == {"accuracy": 0.6}
    # Label 0 everywhere: a metric counting pred == 0 (or label == 0) would not say 2/5.
    zeros = EvalPrediction(predictions=logits, label_ids=np.zeros(5, dtype=int))
    assert get_task("seq_cls").compute_metrics(zeros) == {"accuracy": 0.4}
    three = np.array([[0.0, 1.0, 2.0], [9.0, 1.0, 2.0]])
    assert get_task("seq_cls").compute_metrics(EvalPrediction(three, np.array([2, 2]))) == {
        "accuracy": 0.5
    }


@pytest.mark.parametrize(("r", "alpha", "scaling"), [(8, 16, "2"), (4, 16, "4"), (16, 8, "0.5")])
def test_model_card_states_alpha_over_r(tiny_bert, r, alpha, scaling):
    p = small_params(str(tiny_bert))
    params = stage_params(p, [*TRAIN_KEYS, "data.train", "data.eval"])
    params.update({"lora.r": r, "lora.alpha": alpha})
    card = model_card("LoRA adapter", params, {"loss": 0.3, "accuracy": 0.9}, "from peft import X")
    assert f"LoRA r={r}, alpha={alpha} (scaling alpha/r = {scaling}) on query, value;" in card
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {
        "library_name": "peft",
        "base_model": str(tiny_bert),
        "tags": ["lora", "peft", "dvc", "seq_cls"],
    }
    assert "```python\nfrom peft import X\n```" in card
    # Metrics as sorted, indented JSON; params in the order the stage lists them.
    assert '```json\n{\n  "accuracy": 0.9,\n  "loss": 0.3\n}\n```' in card
    shown = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(shown) == params
    assert [line.split(":")[0] for line in shown.splitlines()[:3]] == list(params)[:3]
    assert list(params)[:3] != sorted(params)[:3]


def test_model_card_tags_4_bit_as_qlora(tiny_bert):
    params = stage_params(small_params(str(tiny_bert)), [*TRAIN_KEYS, "data.train", "data.eval"])
    params["quant.bits"] = 4
    card = model_card("t", params, {}, "")
    assert yaml.safe_load(card.split("---\n")[1])["tags"][-1] == "qlora"
    assert "base quantization: 4." in card


def test_effective_batch_counts_every_device(tiny_bert, tmp_path, monkeypatch):
    """B x K x D: one process here, told by TrainingArguments that it is one of 3 ranks."""
    p = small_params(str(tiny_bert), batch_size=4, grad_accum=2, max_steps=1, save_steps=1)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rows = datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine film"] * 4})
    rows = rows.add_column("label", [1, 0, 1] * 4)
    train_rows = get_task("seq_cls").tokenize(rows, tok, p, "data.train")
    (tmp_path / "tok").mkdir()
    datasets.DatasetDict({"train": train_rows}).save_to_disk(str(tmp_path / "tok"))
    (tmp_path / "tok" / "meta.json").write_text("{}")
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 3))
    out = tmp_path / "out"
    summary = train(p, tmp_path / "tok", out / "adapter", out / "ckpt", out / "rep", out / "work")
    assert (summary["effective_batch_size"], summary["devices"]) == (24, 3)
    logged = json.loads((out / "rep" / "metrics.json").read_text())
    assert (logged["effective_batch_size"], logged["devices"]) == (24, 3)
    assert "effective_batch_size" in (out / "adapter" / "README.md").read_text()
