"""Certificates on the adapter, checkpoint and merged folders, and `lorapipe verify`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorapipe import cli
from lorapipe.config import load_params
from lorapipe.provenance import CERTIFICATE, certify, git_state, md5
from tests.conftest import ROOT, dvc, make_project, run, set_params

TINY = {
    "data.max_train_rows": 48,
    "data.max_eval_rows": 16,
    "tokenize.max_length": 32,
    "train.epochs": 1,
    "train.batch_size": 8,
    "train.logging_steps": 2,
    "train.save_steps": 50,
}
FOLDERS = {"models/adapter": "train", "models/checkpoint": "train", "models/merged": "merge"}


@pytest.fixture(scope="module")
def project(tiny_bert, tmp_path_factory):
    """A project copy whose tokenize, train and merge ran in this process, from its root."""
    path = make_project(
        tmp_path_factory.mktemp("provenance"), {**TINY, "model.name": str(tiny_bert)}
    )
    from lorapipe.data import tokenize
    from lorapipe.merge import merge
    from lorapipe.training import train

    cwd = Path.cwd()
    os.chdir(path)
    try:
        p = load_params("params.yaml")
        tokenize(p, Path("data/tokenized"))
        models, reports = Path("models"), Path("reports")
        train(
            p, Path("data/tokenized"), models / "adapter", models / "checkpoint",
            reports / "train", models / ".work",
        )  # fmt: skip
        merge(
            p, Path("data/tokenized"), models / "adapter", models / "merged",
            reports / "merge.json", reports / "train/metrics.json",
        )  # fmt: skip
    finally:
        os.chdir(cwd)
    return path


def verify(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`lorapipe verify FOLDER` in this process: (exit code, what it printed)."""
    try:
        cli.main(["verify", str(folder)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out + out.err


def git(path: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args]
    return subprocess.run(cmd, cwd=path, check=True, capture_output=True, text=True).stdout.strip()


def copied(project: Path, tmp_path: Path) -> Path:
    shutil.copytree(project / "models/adapter", tmp_path / "adapter")
    return tmp_path / "adapter"


def stage_spec(project: Path, name: str) -> tuple[list[str], list[str]]:
    stage = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][name]
    return stage["deps"], stage["params"]


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_every_artifact_carries_its_certificate(project, folder):
    cert = json.loads((project / folder / CERTIFICATE).read_text())
    stage = FOLDERS[folder]
    assert (cert["artifact"], cert["stage"]) == (folder, stage)
    assert cert["git"] == {
        "commit": git(project, "rev-parse", "HEAD"),
        "dirty": False,
        "changed": [],
    }
    deps, params = stage_spec(project, stage)
    assert sorted(cert["inputs"]["deps"]) == sorted(deps)  # exactly dvc.yaml's list
    assert sorted(cert["inputs"]["params"]["params.yaml"]) == sorted(params)
    recorded = cert["inputs"]["params"]["params.yaml"]
    assert recorded["task"] == "seq_cls" and recorded["tokenize"]["max_length"] == 32  # sections
    assert cert["inputs"]["deps"]["data/tokenized"].endswith(".dir")
    assert cert["inputs"]["deps"]["src/lorapipe/lora.py"] == md5(project / "src/lorapipe/lora.py")
    assert set(cert["versions"]) == {
        "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "dvc",
    }  # fmt: skip
    assert cert["machine"]["accelerator"] == "cpu" and cert["machine"]["cpu"]
    assert {"base_dtype", "mixed_precision", "attn_implementation", "world_size"} <= set(
        cert["runtime"]
    )
    metrics = project / ("reports/merge.json" if stage == "merge" else "reports/train/metrics.json")
    assert cert["metrics"] == json.loads(metrics.read_text())
    files = {f.name for f in (project / folder).iterdir()} - {CERTIFICATE}
    assert set(cert["files"]) == files and "README.md" in files
    weights = next(f for f in cert["files"] if f.endswith(".safetensors"))
    assert cert["files"][weights] == md5(project / folder / weights)
    card = (project / folder / "README.md").read_text()
    assert "## Provenance" in card and cert["git"]["commit"] in card
    assert cert["inputs"]["deps"]["src/lorapipe/lora.py"] in card  # the inputs, in the text too


def test_verify_passes_on_an_untouched_artifact(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    for folder in FOLDERS:
        code, out = verify(Path(folder), capsys)
        assert code == 0, out
        assert {"files: ok", "code: ok", "data: ok", "params: ok", "machine: ok"} <= {
            line.split(" (")[0] for line in out.splitlines()
        }, out


def test_verify_names_an_edited_code_dep(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    source = project / "src/lorapipe/lora.py"
    text = source.read_text()
    source.write_text(text + "# edited\n")
    try:
        code, out = verify(Path("models/adapter"), capsys)
    finally:
        source.write_text(text)
    assert code == 1, out
    assert "code: differs: src/lorapipe/lora.py" in out.splitlines()
    assert "data: ok" in out.splitlines()


def test_verify_names_changed_data(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    meta = project / "data/tokenized/meta.json"
    text = meta.read_text()
    meta.write_text(text + "\n")
    try:
        code, out = verify(Path("models/merged"), capsys)
    finally:
        meta.write_text(text)
    assert code == 1, out
    assert "data: differs: data/tokenized" in out.splitlines()


def test_verify_names_a_changed_param(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    set_params(project, {"lora.r": 4})
    try:
        code, out = verify(Path("models/adapter"), capsys)
    finally:
        set_params(project, {"lora.r": 8})
    assert code == 1, out
    assert "params: differs: lora.r (8 certified, 4 here)" in out.splitlines()
    assert "code: ok" in out.splitlines()


@pytest.mark.parametrize(
    ("field", "value", "line"),
    [
        ("versions", {"torch": "1.0"}, "versions: differs: torch 1.0 → "),
        ("machine", {"cpu": "Other CPU"}, "machine: differs: cpu Other CPU → "),
        ("machine", {"cpu_flags": ["amx_bf16"]}, "machine: differs: cpu_flags ['amx_bf16'] → "),
    ],
)
def test_verify_names_other_libraries_and_machines(
    project, tmp_path, capsys, monkeypatch, field, value, line
):
    copy = copied(project, tmp_path)
    cert = json.loads((copy / CERTIFICATE).read_text())
    cert[field] |= value
    (copy / CERTIFICATE).write_text(json.dumps(cert))
    monkeypatch.chdir(project)
    code, out = verify(copy, capsys)
    assert code == 1, out
    assert any(x.startswith(line) for x in out.splitlines()), out


@pytest.mark.parametrize("damage", ["flip", "delete", "add"])
def test_verify_names_a_damaged_file(project, tmp_path, capsys, monkeypatch, damage):
    copy = copied(project, tmp_path)
    weights = copy / "adapter_model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    else:
        (copy / "extra.bin").write_bytes(b"x")
    monkeypatch.chdir(project)
    code, out = verify(copy, capsys)
    assert code == 2, out
    expected = {
        "flip": "adapter_model.safetensors changed",
        "delete": "adapter_model.safetensors missing",
    }
    assert expected.get(damage, "extra.bin not certified") in out


@pytest.mark.parametrize("damage", ["delete", "garble"])
def test_verify_without_a_readable_certificate(project, tmp_path, capsys, monkeypatch, damage):
    copy = copied(project, tmp_path)
    if damage == "delete":
        (copy / CERTIFICATE).unlink()
    else:
        (copy / CERTIFICATE).write_text("{not json")
    monkeypatch.chdir(project)
    code, out = verify(copy, capsys)
    assert code == 2
    assert out.startswith("error: verify: ") and CERTIFICATE in out


def test_a_folder_outside_the_stages_records_no_inputs(project, tmp_path, capsys, monkeypatch):
    from lorapipe.modeling import load_config
    from lorapipe.runtime import resolve

    monkeypatch.chdir(project)
    p = load_params("params.yaml")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"1")
    cert = certify(folder, folder, resolve(p, load_config(p)), {"loss": 1.0})
    assert (cert["stage"], cert["inputs"], cert["metrics"]) == (None, None, {"loss": 1.0})
    assert set(cert["files"]) == {"README.md", "weights.bin"}
    assert "Written outside a dvc.yaml stage" in (folder / "README.md").read_text()
    code, out = verify(folder, capsys)
    assert code == 1 and "inputs: not recorded" in out, out


def test_verify_outside_a_project_is_one_line(project, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = verify(project / "models/adapter", capsys)
    assert code == 2 and out.startswith("error: verify: no dvc.yaml in "), out


def test_a_gpu_machine_records_name_count_and_capability(project):
    from lorapipe.card import provenance_section
    from lorapipe.provenance import machine
    from lorapipe.runtime import describe

    m = machine(describe("h100x8"))
    assert (m["accelerator"], m["gpu"], m["count"], m["capability"]) == (
        "cuda", "NVIDIA H100 80GB HBM3", 8, "9.0",
    )  # fmt: skip
    cert = json.loads((project / "models/adapter" / CERTIFICATE).read_text())
    card = provenance_section(cert | {"machine": m})
    assert "- machine: NVIDIA H100 80GB HBM3 ×8, compute capability 9.0\n" in card


def test_dirty_means_an_input_changed_not_an_output(tmp_path):
    stage = {"cmd": "x", "outs": ["models/a"], "metrics": [{"m.json": {"cache": False}}]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": stage}}))
    for name in ("code.py", "m.json", "dvc.lock", "models/a/f"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("1")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "c")
    for name in ("m.json", "dvc.lock", "models/a/f"):  # what DVC rewrites or deletes
        (tmp_path / name).write_text("2")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("2")
    assert git_state(tmp_path) | {"commit": ""} == {
        "commit": "",
        "dirty": True,
        "changed": ["code.py"],
    }


def test_no_git_is_unknown_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_state(tmp_path) == {"commit": "unknown", "dirty": "unknown"}  # not a repository
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary
    assert git_state(ROOT) == {"commit": "unknown", "dirty": "unknown"}


def lock_inputs(stage: dict) -> dict:
    return {"deps": {d["path"]: d["md5"] for d in stage["deps"]}, "params": stage["params"]}


@pytest.mark.slow
def test_certificates_equal_dvc_lock_in_repro_and_a_temp_experiment(tiny_bert, tmp_path):
    path = make_project(tmp_path, {**TINY, "model.name": str(tiny_bert)})
    dvc("repro", "merge", cwd=path)
    lock = yaml.safe_load((path / "dvc.lock").read_text())["stages"]
    for folder, stage in FOLDERS.items():
        cert = json.loads((path / folder / CERTIFICATE).read_text())
        assert cert["inputs"] == lock_inputs(lock[stage]), folder
    lorapipe = str(Path(sys.executable).parent / "lorapipe")
    assert run([lorapipe, "verify", "models/merged"], cwd=path).stdout.count(": ok") == 6
    git(path, "add", "-A")
    git(path, "commit", "-qm", "repro")
    head = git(path, "rev-parse", "HEAD")
    # In a copy under .dvc/tmp/exps with its own git: HEAD is the baseline, -S left uncommitted.
    dvc("exp", "run", "--temp", "-n", "r4", "-S", "lora.r=4", "train", cwd=path)
    ref = git(path, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    assert len(ref) == 1 and ref[0].endswith("/r4")
    lock = yaml.safe_load(git(path, "show", f"{ref[0]}:dvc.lock"))
    cache = path / ".dvc/cache/files/md5"
    out = next(o for o in lock["stages"]["train"]["outs"] if o["path"] == "models/adapter")
    listing = json.loads((cache / out["md5"][:2] / out["md5"][2:]).read_text())
    entry = next(e for e in listing if e["relpath"] == CERTIFICATE)
    cert = json.loads((cache / entry["md5"][:2] / entry["md5"][2:]).read_text())
    assert cert["inputs"] == lock_inputs(lock["stages"]["train"])
    assert cert["inputs"]["params"]["params.yaml"]["lora"]["r"] == 4
    assert cert["git"] == {
        "commit": head,
        "dirty": True,
        "changed": ["params.yaml"],
        "experiment": {"name": "r4", "baseline": head},
    }
