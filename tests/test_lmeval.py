"""`lorapipe lm-eval`: the harness on a merged folder, a flat metrics file, one-line errors."""

from __future__ import annotations

import json
import math
import sys

import pytest

from lorapipe.cli import main
from lorapipe.lmeval import INSTALL, flatten
from tests.conftest import ROOT

pytest.importorskip("lm_eval", reason="the lmeval extra: pip install -e '.[lmeval]'")


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as code:
        main(argv)
    assert code.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_flatten_keeps_numeric_metrics_only():
    results = {
        "t": {
            "alias": "t",
            "sample_len": 8,
            "acc,none": 0.5,
            "acc_stderr,none": 0.1,
            "acc_norm,none": float("nan"),
            "exact_match,strict-match": 1,
            "bleu,none": "N/A",
            "flag,none": True,
        },
        "empty": {"alias": "empty"},
    }
    assert flatten(results) == {"t": {"acc": 0.5, "exact_match_strict-match": 1.0}}


def test_local_sst2_task_writes_a_flat_metrics_file(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the task reads data/raw/sst2/dev.tsv from the project root
    out = tmp_path / "reports" / "lm_eval.json"
    args = ["--model", str(tiny_llama), "--limit", "8", "--out", str(out)]
    main(["lm-eval", "--tasks", "sst2_local", *args])
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"sst2_local"}
    acc = metrics["sst2_local"]["acc"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0 and math.isfinite(acc)
    assert all(isinstance(v, float) for row in metrics.values() for v in row.values())
    assert not list(out.parent.glob(".*tmp*"))  # written through a temporary sibling
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out}"


def test_an_unknown_task_is_one_line_before_the_model_loads(tiny_llama, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    line = _error(capsys, ["lm-eval", "--tasks", "sst2_lcal", "--model", str(tiny_llama)])
    assert line.startswith("error: --tasks: unknown task 'sst2_lcal'")
    assert "sst2_local" in line  # the close match


def test_a_missing_model_folder_is_one_line(tmp_path, capsys):
    line = _error(capsys, ["lm-eval", "--tasks", "sst2_local", "--model", str(tmp_path / "no")])
    assert line.startswith(f"error: --model: {tmp_path / 'no'} does not exist")


def test_a_classifier_folder_is_refused(tiny_bert, capsys):
    line = _error(capsys, ["lm-eval", "--tasks", "sst2_local", "--model", str(tiny_bert)])
    assert "lm-eval needs a *ForCausalLM model" in line


def test_without_lm_eval_one_line_says_how_to_install(tiny_llama, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    line = _error(capsys, ["lm-eval", "--tasks", "sst2_local", "--model", str(tiny_llama)])
    assert line == f"error: {INSTALL}"
    assert INSTALL == "lm-eval is not installed: pip install -e '.[lmeval]'"
