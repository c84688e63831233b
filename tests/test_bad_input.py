"""Bad input is refused before heavy work, in one line, leaving nothing half-written."""

import json
import subprocess
import sys
import time

import pytest

from lorapipe.config import UserError, parse_params
from lorapipe.data import tokenize
from lorapipe.modeling import preflight
from tests.conftest import ROOT, make_project, set_params


def params_with(model, **changes):
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["name"] = str(model)
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return parse_params(raw)


def test_max_length_over_the_position_limit(tiny_bert):
    with pytest.raises(UserError, match=r"tokenize\.max_length: 256 exceeds the model.s position"):
        preflight(params_with(tiny_bert, **{"tokenize.max_length": 256}))


def test_a_task_the_model_cannot_do(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(UserError, match=r"task: the model \(vit\) cannot do seq_cls"):
        preflight(params_with(tmp_path))


def test_quantization_where_bitsandbytes_cannot_run(tiny_bert, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as on a broken install
    with pytest.raises(UserError, match=r"quant\.bits: bitsandbytes cannot run here"):
        preflight(params_with(tiny_bert, **{"quant.bits": 4}))


def test_bad_labels_leave_no_tokenized_output(tiny_bert, tmp_path):
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\ngood\t1\nbad\t7\n")
    p = params_with(tiny_bert, **{"data.train": str(data), "data.eval": str(data)})
    with pytest.raises(UserError, match=r"row 2: label 7 is outside 0\.\.1"):
        tokenize(p, tmp_path / "tokenized")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["train.tsv"]  # no temp folder either


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora.r": 0}, "error: params.yaml: lora.r: Input should be greater than 0"),
        ({"data.train": "data/raw/missing.tsv"}, "error: data.train: file not found"),
        ({"model.name": "bert-base-uncased"}, "error: model.name: 'bert-base-uncased' is a hub"),
        ({"lora.target_modules": ["q_proj"]}, "error: lora.target_modules: q_proj match no"),
    ],
)
def test_stage_scripts_exit_2_with_one_line(tmp_path, change, message):
    project = make_project(tmp_path)
    set_params(project, change)
    script = "stages/train.py" if "lora.target_modules" in change else "stages/tokenize_data.py"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, script],
        cwd=project,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert time.perf_counter() - start < 60
    assert not (project / "data/tokenized").exists()
