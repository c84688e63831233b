"""GPU: this pipeline's train path against plain HF + PEFT, on big architectures, no download.

Qwen2.5-3B and Llama-3.1-8B built from the configs shipped in lorapipe/model_configs with
random weights (saved once to a temporary folder, with a two-token tokenizer), bf16 LoRA and
4-bit QLoRA, at seq 512 and 2048, on synthetic full-length rows. Per cell and side: tokens/s,
MFU and peak memory. Each side runs in its own process (clean CUDA state, its own peak memory,
an OOM costs one cell): bench/gpu_side.py.

- pipeline: resolve() + lorapipe.training.train (its modeling, Trainer setup, NaN guard).
- plain: a minimal HF + PEFT script: from_pretrained in bf16 (BitsAndBytesConfig NF4 + double
  quant, bf16 compute for QLoRA), prepare_model_for_kbit_training, get_peft_model, a default
  Trainer with bf16=True.
Same LoRA (r 16, alpha 32, all linear projections), batch, steps, learning rate and gradient
checkpointing on both sides.

MFU convention: 4·N FLOPs per token (forward 2N + backward 2N for activation gradients only,
the base being frozen), N the base's parameters; LoRA's and attention's FLOPs and recomputation
are not counted; the denominator is runtime.GPUS' dense bf16 peak. Timed from the end of the
warm-up steps to the end of the last step, each end after a host sync.

Each side process sees one GPU (CUDA_VISIBLE_DEVICES: the first visible one): a single process
that saw eight would train under nn.DataParallel over all of them (Trainer's n_gpu).

--gpu-device cpu: the same cells, sides and rows on the CPU (the GPU hidden from the sides), on
tiny random models of the same two architectures (bench/gpu_side.py TINY), seq 32 and 64, a
few steps: the section end to end; its figures are a smoke test and judge no target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.harness import ROOT, row_text
from lorapipe.config import Params, parse_params
from lorapipe.runtime import detect

MODELS = {"qwen2.5-3b": "Qwen/Qwen2.5-3B", "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct"}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NO_CUDA = "no CUDA device: the gpu section needs one (nothing was run)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("gpu section")
    g.add_argument("--gpu-models", nargs="+", choices=list(MODELS), default=list(MODELS))
    g.add_argument("--gpu-device", choices=["cuda", "cpu"], default="cuda", help="cpu: tiny")
    g.add_argument("--gpu-seqs", nargs="+", type=int, help="512 2048 (cpu: 32 64)")
    g.add_argument("--gpu-quant", nargs="+", choices=["none", "4"], default=["none", "4"])
    g.add_argument("--gpu-steps", type=int, help="timed steps per side (20; quick 3; cpu 2)")
    g.add_argument("--gpu-warmup", type=int, help="untimed steps first (3; cpu 1)")
    g.add_argument("--gpu-tokens-per-step", type=int, help="batch = this / seq (16384; cpu 128)")
    g.add_argument("--gpu-no-checkpointing", action="store_true", help="both sides: off")
    g.add_argument("--liger", action="store_true", help="both sides: use_liger_kernel")
    g.add_argument("--compile", action="store_true", help="both sides: torch_compile")


def cell_params(weights: str, seq: int, quant: str, batch: int, steps: int, gc: bool) -> Params:
    """The pipeline side's params; the plain side copies its settings from them."""
    return parse_params(
        {
            "task": "causal_lm",
            "data": {"train": "synthetic", "eval": None, "text_field": "text"},
            "model": {"name": weights},
            "tokenize": {"max_length": seq, "layout": "pack"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": TARGET_MODULES},
            "quant": {"bits": quant if quant == "none" else int(quant)},
            "train": {
                "seed": 42,
                "batch_size": batch,
                "max_steps": steps,
                "learning_rate": 2e-4,
                "mixed_precision": "auto",
                "gradient_checkpointing": gc,
                "eval_strategy": "no",
                "logging_steps": 10_000,
                "save_steps": 10_000,
            },
        },
        "bench gpu",
    )


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets' measures: the worst bf16 LoRA MFU, the worst QLoRA speedup over plain."""
    mfu = [c["pipeline"]["mfu"] for c in cells if c["quant"] == "none" and "mfu" in c["pipeline"]]
    speedups = [c["speedup"] for c in cells if c["quant"] != "none" and "speedup" in c]
    return {
        "bf16_lora_mfu_min": min(mfu) if mfu else None,
        "qlora_speedup_min": min(speedups) if speedups else None,
    }


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    """The cells' sizes: the flags given, else the GPU's defaults, or the CPU mode's."""
    cpu = args.gpu_device == "cpu"
    defaults = {
        "seqs": [32, 64] if cpu else [512, 2048],
        "steps": 2 if cpu else 3 if args.quick else 20,
        "warmup": 1 if cpu else 3,
        "tokens_per_step": 128 if cpu else 16384,
    }
    given = {
        "seqs": args.gpu_seqs,
        "steps": args.gpu_steps,
        "warmup": args.gpu_warmup,
        "tokens_per_step": args.gpu_tokens_per_step,
    }
    return {k: defaults[k] if given[k] is None else given[k] for k in defaults}


def run(args: argparse.Namespace, p: Params) -> dict[str, Any]:
    machine = detect()
    device = args.gpu_device
    if device == "cuda" and machine.accelerator != "cuda":
        return {"skipped": NO_CUDA}
    size = sizes(args)
    cells = []
    with tempfile.TemporaryDirectory(prefix="lorapipe-gpu-bench-") as tmp:
        for model in args.gpu_models:
            weights = Path(tmp) / model
            argv = ["--materialize", MODELS[model], "--weights", str(weights)]
            side_process(argv + ["--tiny"] * (device == "cpu"), device)
            for quant in args.gpu_quant:
                for seq in size["seqs"]:
                    cell: dict[str, Any] = {"model": model, "quant": quant, "seq": seq}
                    for side in ("pipeline", "plain"):
                        out = Path(tmp) / f"{model}-{quant}-{seq}-{side}.json"
                        argv = ["--side", side, "--weights", str(weights), "--quant", quant]
                        argv += ["--seq", str(seq), "--steps", str(size["steps"])]
                        argv += ["--out", str(out), "--warmup", str(size["warmup"])]
                        argv += ["--tokens-per-step", str(size["tokens_per_step"])]
                        argv += ["--no-checkpointing"] * args.gpu_no_checkpointing
                        argv += ["--liger"] * args.liger + ["--compile"] * args.compile
                        error = side_process(argv, device, check=False)
                        cell[side] = {"error": error} if error else json.loads(out.read_text())
                    if "tokens_per_s" in cell["pipeline"] and "tokens_per_s" in cell["plain"]:
                        ratio = cell["pipeline"]["tokens_per_s"] / cell["plain"]["tokens_per_s"]
                        cell["speedup"] = round(ratio, 2)
                    cells.append(cell)
            for f in weights.iterdir():  # 6-16 GB per model: gone before the next one
                f.unlink()
    return {
        "device": machine.name if device == "cuda" else "cpu, tiny models",
        "peak_tflops": machine.peak_tflops if device == "cuda" else None,
        "mfu_convention": "4·N·tokens/s / peak (frozen base: forward 2N + backward 2N)",
        "switches": {"liger": args.liger, "compile": args.compile},
        "gradient_checkpointing": not args.gpu_no_checkpointing,
        "cells": cells,
        # The targets are a GPU's: a CPU smoke run of tiny models judges none.
        "summary": summarize(cells if device == "cuda" else []),
    }


def side_env(device: str, environ: Mapping[str, str]) -> dict[str, str]:
    """A side's environment: bench and lorapipe importable, and the one device it may use.

    cuda: the first GPU this process sees (a side that saw eight would train under
    nn.DataParallel over all of them: Trainer's n_gpu). cpu: none, so torch reports no CUDA."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0] if visible else "0"
    return {
        **environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
        "CUDA_VISIBLE_DEVICES": first if device == "cuda" else "",
    }


def side_process(argv: list[str], device: str, check: bool = True) -> str | None:
    """Run `python -m bench.gpu_side ARGV` on one device; the last stderr line if it failed."""
    env = side_env(device, os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_side", *argv, "--device", device],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    if check:
        raise RuntimeError(f"bench.gpu_side {' '.join(argv[:2])}: {last}")
    return last


def lines(section: dict[str, Any]) -> list[str]:
    out = [f"GPU ({section['device']}; MFU = {section['mfu_convention']})"]
    out.append(row_text("model / quant / seq", "pipeline tok/s", "plain tok/s", "ratio"))
    for c in section["cells"]:
        pipe, plain = c["pipeline"], c["plain"]
        label = f"{c['model']} {c['quant']} {c['seq']}"
        out.append(
            row_text(
                label,
                pipe.get("tokens_per_s", "failed"),
                plain.get("tokens_per_s", "failed"),
                c.get("speedup", ""),
            )
        )
        for key, name in (("mfu", "  MFU"), ("peak_memory_gb", "  peak GB")):
            # None, or absent from a side that ran: a CPU has no peak TFLOP/s and no GPU memory
            cells = [s.get(key) if "error" not in s else "" for s in (pipe, plain)]
            out.append(row_text(name, *("-" if v is None else v for v in cells)))
    return out
