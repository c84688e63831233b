from lorapipe.compare import parse_exp_show, table


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
