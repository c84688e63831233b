"""Bad input is refused before heavy work, in one line, leaving nothing half-written."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorapipe.cli import main
from lorapipe.config import UserError, parse_params
from lorapipe.data import tokenize
from lorapipe.data_sources import load_rows
from lorapipe.modeling import preflight
from tests.conftest import ROOT, dvc, make_project, set_params

STAGES = ["tokenize_data.py", "train.py", "evaluate.py", "merge.py", "plot.py"]


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
    with pytest.raises(UserError, match=r"data.train: line 3: label 7 is outside 0\.\.1"):
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


HEAVY = ("torch", "transformers", "peft", "datasets", "bitsandbytes")


def light_run(cwd, *argv, env=None):
    """Run a stage script or `lorapipe ...` and report which heavy libraries it imported."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = {list(argv)!r}\n"
        "try:\n"
        "    if sys.argv[0].endswith('.py'):\n"
        "        runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "    else:\n"
        "        from lorapipe.cli import main\n"
        "        main(sys.argv[1:])\n"
        "finally:\n"
        f"    print('imported:', *[m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env
    )
    return proc, time.perf_counter() - start


def error_lines(proc):
    return [x for x in proc.stderr.splitlines() if x.strip()]


def write_params(folder, **changes):
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize(
    "argv",
    [
        *([str(ROOT / "stages" / s)] for s in STAGES),
        ["lorapipe", "check"],
        ["lorapipe", "predict"],
    ],
    ids=[*STAGES, "check", "predict"],
)
def test_params_error_comes_before_torch_loads(tmp_path, argv):
    write_params(tmp_path, **{"lora.r": 0})
    proc, seconds = light_run(tmp_path, *argv)
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc) == [
        "error: params.yaml: lora.r: Input should be greater than 0 (got 0)"
    ]
    assert proc.stdout.strip() == "imported:", f"{proc.stdout} after {seconds:.1f} s"


def test_make_repro_reports_a_duplicate_key_in_one_line_before_dvc(tmp_path):
    # DVC's own reader would say it in 12 lines; `make repro` checks the params first.
    text = (ROOT / "params.yaml").read_text().replace("  r: 8\n", "  r: 8\n  r: 4\n")
    (tmp_path / "params.yaml").write_text(text)
    shutil.copy(ROOT / "Makefile", tmp_path)
    venv = Path(sys.prefix)  # this test run's venv: installed, so nothing is remade
    proc = subprocess.run(
        ["make", "-o", str(venv / ".installed"), "repro", f"VENV={venv}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    line = text.splitlines().index("  r: 8") + 1
    ours = [x for x in error_lines(proc) if not re.match(r"make(\[\d+\])?: ", x)]  # make[1]: too
    assert ours == [
        f"error: params.yaml: lora.r: duplicate key (lines {line} and {line + 1}); keep one"
    ]
    assert "dvc repro" not in proc.stdout


def test_dvc_exp_run_error_says_how_to_restore_params(tmp_path):
    write_params(tmp_path, **{"lora.r": 0})
    script = str(ROOT / "stages/train.py")
    env = {"DVC_EXP_NAME": "exp-1", "DVC_ROOT": str(tmp_path)}
    proc, _ = light_run(tmp_path, script, env=env)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 2 and lines[0].endswith("lora.r: Input should be greater than 0 (got 0)")
    assert "`git checkout params.yaml`" in lines[1] and "dvc exp run --temp" in lines[1]
    # A --temp or queued experiment runs in a copy: the workspace's params.yaml is untouched.
    proc, _ = light_run(tmp_path, script, env={**env, "DVC_ROOT": str(ROOT)})
    assert "params.yaml is unchanged" in error_lines(proc)[1]


def test_dvc_exp_run_with_a_bad_value_explains_the_changed_params(tmp_path):
    project = make_project(tmp_path)
    proc = dvc("exp", "run", "-S", "lora.r=0", cwd=project, check=False)
    assert proc.returncode != 0
    assert "error: params.yaml: lora.r: Input should be greater than 0" in proc.stderr
    assert "`git checkout params.yaml`" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"sentence\tlabel\ngood\t1\nna\xefve\t0\n", "not UTF-8 text at line 3, column 3"),
        (
            b"sentence\tlabel\n\xe2\x80\x9cok\xe2\x80\x9d \xff\t1\n",
            "not UTF-8 text at line 2, column 6",
        ),
    ],
)
def test_non_utf8_data_names_line_and_column(tmp_path, content, message):
    path = tmp_path / "train.tsv"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"data.train: {path}: {message}$"):
        load_rows(str(path), "data.train")


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(UserError, match=rf"data.train: {tmp_path} is a directory; name a file"):
        load_rows(str(tmp_path), "data.train")


def _check(tmp_path, capsys, **changes):
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as code:
        main(["check", "--params", str(path)])
    assert code.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_check_reads_every_data_files_header(tmp_path, capsys, monkeypatch):
    import lorapipe.modeling

    def no_model(p):
        raise AssertionError("the data must be checked before the model")

    monkeypatch.setattr(lorapipe.modeling, "preflight", no_model)
    (tmp_path / "text.tsv").write_text("text\tlabel\nfine\t1\n")
    (tmp_path / "qa.jsonl").write_text('\n{"question": "q", "output": "a"}\n')
    sst2 = str(ROOT / "data/raw/sst2/train.tsv")
    cases = [
        (
            {"data.train": str(tmp_path / "text.tsv")},
            "error: data.train: no 'sentence' column (set data.text_field; "
            "columns: ['text', 'label'])",
        ),
        ({"data.train": str(tmp_path)}, f"error: data.train: {tmp_path} is a directory"),
        ({"data.eval": "data/raw/nope.tsv"}, "error: data.eval: file not found: data/raw/nope"),
        (
            {"data.train": sst2, "data.label_field": "polarity"},
            "error: data.train: no 'polarity' column (set data.label_field;",
        ),
    ]
    for changes, message in cases:
        assert _check(tmp_path, capsys, **changes).startswith(message)
    line = _check(tmp_path, capsys, **{"data.train": str(tmp_path / "qa.jsonl")})
    assert line.startswith("error: data.train: no 'sentence' column")


def test_check_says_ok_for_each_data_file(tiny_bert, tmp_path, capsys, monkeypatch):
    write_params(tmp_path, **{"model.name": str(tiny_bert)})
    shutil.copytree(ROOT / "data/raw", tmp_path / "data/raw")
    monkeypatch.chdir(tmp_path)
    main(["check"])
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [
        "ok: data.train: data/raw/sst2/train.tsv (5001 lines)",
        "ok: data.eval: data/raw/sst2/dev.tsv (873 lines)",
    ]
