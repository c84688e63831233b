"""The benchmark's measuring parts: the meter counts what the model computes on; verdicts."""

import datasets
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, default_data_collator

from bench import harness, report
from lorapipe.lora import lora_config
from tests.test_reliability import small_params


def test_meter_counts_real_and_padded_positions_of_every_training_batch(tiny_bert):
    real = [3, 5, 16, 2, 7, 9, 4, 6]
    rows = datasets.Dataset.from_dict(
        {
            "input_ids": [[101] * 16 for _ in real],
            "attention_mask": [[1] * n + [0] * (16 - n) for n in real],
            "labels": [i % 2 for i in range(len(real))],
        }
    )
    p = small_params(str(tiny_bert), batch_size=4)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert), lora_config(p)
    )
    meter = harness.tutorial_train(model, p, rows, default_data_collator)
    assert meter.rows == [4, 4]
    assert meter.total == [64, 64]
    assert sum(meter.real) == sum(real)
    assert len(meter.step_ends) == 2
    result = harness.side_result(meter, seconds=2.0)
    assert result["samples_per_s"] == 4.0
    assert result["real_token_fraction"] == round(sum(real) / 128, 4)
    model.train()  # the hook went at train end: a later forward is not counted
    model(**default_data_collator([rows[0]]))
    assert meter.rows == [4, 4]


def test_a_missed_target_says_by_how_much():
    assert report.judge(9.58, 10.0, True, "x") == {
        "target": ">= 10.0x",
        "measured": 9.58,
        "met": False,
        "miss": "short by 0.42x (4% of the target)",
    }
    assert report.judge(1.5, 3.0, False, " s")["met"] is True
    assert report.judge(None, 3.0, False, " s")["met"] is None  # a skipped section


def test_equal_accuracies_at_the_majority_rate_are_inconclusive():
    side = {"accuracy": 0.51}
    result = {
        "classification": {
            "tutorial": side,
            "pipeline": side,
            "accuracy_delta_points": 0.0,
            "majority_class_accuracy": 0.509,
            "speedup_samples_per_s": 10.5,
        },
        "causal_lm": {"skipped": "no data"},
        "noop_repro": {"seconds": 1.5},
        "sst2_tokenize": {"seconds": 4.0},
    }
    verdicts = report.targets(result)
    assert verdicts["classification_accuracy_drop_points"]["met"] is None
    assert verdicts["classification_speedup"]["met"] is True
    assert verdicts["causal_speedup_256"]["met"] is None


def test_cpu_busy_fraction_is_the_busy_share_of_the_interval(monkeypatch):
    # /proc/stat's first line: user nice system idle iowait irq softirq steal guest guest_nice
    stats = iter(["cpu 100 0 100 700 100 0 0 0 0 0\n", "cpu 160 0 140 800 100 0 0 0 0 0\n"])
    monkeypatch.setattr(harness.Path, "read_text", lambda self: next(stats))
    monkeypatch.setattr(harness.time, "sleep", lambda s: None)
    assert harness.cpu_busy_fraction(0.1) == 0.5  # 100 busy ticks of the 200 that went by


def test_cpu_busy_fraction_reads_this_machine():
    busy = harness.cpu_busy_fraction(0.2)
    assert isinstance(busy, float) and 0.0 <= busy <= 1.0  # Linux: never None here


def test_cpu_busy_fraction_is_none_without_proc_stat(monkeypatch):
    def missing(self):
        raise FileNotFoundError(self)

    monkeypatch.setattr(harness.Path, "read_text", missing)
    assert harness.cpu_busy_fraction(0.0) is None
