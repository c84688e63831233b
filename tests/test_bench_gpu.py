"""The benchmark's precision verdict and its gpu section: what can be checked on a CPU.

The gpu section refuses without CUDA; its CPU mode (--gpu-device cpu) runs the same cells, side
processes and rows on tiny models of the same architectures, here for real.
(`make gpu-check`: tests/test_gpu_check.py.)
"""

import json
import os
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


def test_each_side_process_sees_one_device():
    env = gpu.side_env("cuda", {"PATH": "/usr/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "0"  # not all eight: Trainer would use DataParallel
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), str(ROOT / "src")]
    assert gpu.side_env("cuda", {"CUDA_VISIBLE_DEVICES": "3,5"})["CUDA_VISIBLE_DEVICES"] == "3"
    assert gpu.side_env("cpu", {"CUDA_VISIBLE_DEVICES": "3,5"})["CUDA_VISIBLE_DEVICES"] == ""


def test_gpu_sizes_default_per_device_and_flags_win():
    sizes = gpu.sizes(run.parse_args(["--only", "gpu"]))
    assert sizes == {"seqs": [512, 2048], "steps": 20, "warmup": 3, "tokens_per_step": 16384}
    assert gpu.sizes(run.parse_args(["--quick"]))["steps"] == 3
    cpu = gpu.sizes(run.parse_args(["--gpu-device", "cpu", "--gpu-steps", "4"]))
    assert cpu == {"seqs": [32, 64], "steps": 4, "warmup": 1, "tokens_per_step": 128}


def test_tiny_weights_keep_the_shipped_architecture(tmp_path):
    from transformers import AutoConfig

    for model, name in gpu.MODELS.items():
        gpu_side.materialize(name, tmp_path / model, tiny=True)
        config = AutoConfig.from_pretrained(tmp_path / model)
        shipped = gpu_side.plan.load_model_config(name)
        assert type(config) is type(shipped), model
        assert config.num_hidden_layers == 2 and len(getattr(config, "layer_types", "..")) == 2
        assert config.tie_word_embeddings == shipped.tie_word_embeddings
        assert config.rope_parameters == shipped.rope_parameters, model  # Llama 3.1: llama3 RoPE


def row(printed: str, label: str) -> list[str]:
    line = next(x for x in printed.splitlines() if x.strip().startswith(label))
    return line.strip()[len(label) :].split()


@pytest.mark.slow
def test_gpu_section_cpu_mode_runs_both_sides_of_every_cell(tmp_path):
    """bench/run.py --only gpu --gpu-device cpu, for real: both tiny architectures, bf16 LoRA and
    4-bit QLoRA, this pipeline and plain HF + PEFT, each side its own process (minutes)."""
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["--only", "gpu", "--gpu-device", "cpu", "--gpu-seqs", "32"]
    proc = subprocess.run(
        [sys.executable, "bench/run.py", *argv, "--out", str(out), "--png", str(png)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GPU (cpu, tiny models;" in proc.stdout
    section = json.loads(out.read_text())["gpu"]
    assert [(c["model"], c["quant"]) for c in section["cells"]] == [
        (m, q) for m in gpu.MODELS for q in ("none", "4")
    ]
    for c in section["cells"]:
        label = f"{c['model']} {c['quant']} 32"
        pipeline, plain, ratio = (float(x) for x in row(proc.stdout, label))
        assert pipeline > 0 and plain > 0 and ratio == c["speedup"], label
        for side in ("pipeline", "plain"):
            assert c[side]["batch"] == 128 // 32 and c[side]["timed_steps"] == 2, (label, side)
            assert 10_000 < c[side]["base_params"] < 1_000_000, (label, side)  # tiny, not 3B
        assert c["pipeline"]["runtime"]["base_dtype"] == "float32", label
        if c["quant"] == "4":
            assert c["pipeline"]["runtime"]["compute_dtype"] == "float32", label
    assert section["summary"] == {"bf16_lora_mfu_min": None, "qlora_speedup_min": None}
