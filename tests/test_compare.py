import pandas as pd
import pytest

from lorapipe.compare import noise_band, parse_exp_show, table


def record(rev, r, accuracy, name=None):
    return {
        "rev": rev,
        "name": name,
        "data": {
            "params": {"params.yaml": {"data": {"lora": {"r": r, "alpha": 16}}}},
            "metrics": {
                "reports/eval.json": {"data": {"accuracy": accuracy}},
                "reports/train/timing.json": {"data": {"train_seconds": 12.5}},
            },
        },
    }


def test_exp_show_json_becomes_one_row_per_experiment():
    shown = [
        record("workspace", 8, 0.84),
        {
            **record("abc1234567", 8, 0.84, "main"),
            "experiments": [
                {"name": "exp-r4", "revs": [record("def7654321", 4, 0.82)]},
                {"name": "exp-r16", "revs": [record("0123456789", 16, 0.85)]},
            ],
        },
    ]
    frame = table(parse_exp_show(shown), ["lora.r"], ["eval:accuracy", "timing:train_seconds"])
    assert frame["experiment"].tolist() == ["workspace", "main", "exp-r4", "exp-r16"]
    assert frame["lora.r"].tolist() == [8, 8, 4, 16]
    assert frame["eval:accuracy"].tolist() == [0.84, 0.84, 0.82, 0.85]
    assert frame["timing:train_seconds"].tolist() == [12.5] * 4


def test_a_failed_experiment_is_marked_and_shows_no_borrowed_metrics():
    # `dvc exp show --json` (DVC 3.x) gives a failed queued run its baseline's data, an error
    # and an executor in state "failed".
    failed = {**record("fedcba9876", 4, 0.84), "error": {"msg": "Experiment run failed"}}
    shown = [
        {
            **record("abc1234567", 8, 0.84, "main"),
            "experiments": [
                {"name": "exp-ok", "revs": [record("def7654321", 16, 0.85)]},
                {"name": "exp-bad", "executor": {"state": "failed"}, "revs": [failed]},
            ],
        },
    ]
    frame = table(parse_exp_show(shown), ["lora.r"], ["eval:accuracy"])
    assert frame["state"].tolist() == ["success", "success", "failed"]
    assert frame["eval:accuracy"].tolist()[:2] == [0.84, 0.85]
    assert pd.isna(frame["eval:accuracy"].tolist()[2])


def seeded(rev, seed, r, accuracy):
    entry = record(rev, r, accuracy)
    entry["data"]["params"]["params.yaml"]["data"]["train"] = {"seed": seed}
    return entry


def test_noise_band_groups_experiments_that_differ_only_in_seed():
    shown = [
        seeded("workspace", 42, 8, 0.80),
        {
            **seeded("abc1234567", 42, 8, 0.80),
            "name": "main",
            "experiments": [
                {"name": f"s{s}", "revs": [seeded(f"{s}" * 10, s, 8, acc)]}
                for s, acc in ((1, 0.82), (2, 0.84), (42, 0.80))
            ]
            + [{"name": "r4", "revs": [seeded("4" * 10, 1, 4, 0.70)]}],
        },
    ]
    band = noise_band(parse_exp_show(shown), "eval:accuracy")
    assert len(band) == 1  # r=4 ran under one seed only: no band
    row = band.iloc[0]
    assert row["n"] == 3 and row["seeds"] == [1, 2, 42]  # seed 42 once, though listed twice
    assert row["mean"] == pytest.approx(0.82)
    assert row["std"] == pytest.approx(0.02)
