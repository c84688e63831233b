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
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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
    g.add_argument("--gpu-seqs", nargs="+", type=int, default=[512, 2048])
    g.add_argument("--gpu-quant", nargs="+", choices=["none", "4"], default=["none", "4"])
    g.add_argument("--gpu-steps", type=int, help="timed steps per side (20; quick 3)")
    g.add_argument("--gpu-warmup", type=int, default=3, help="untimed steps first")
    g.add_argument("--gpu-tokens-per-step", type=int, default=16384, help="batch = this / seq")
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


def run(args: argparse.Namespace, p: Params) -> dict[str, Any]:
    machine = detect()
    if machine.accelerator != "cuda":
        return {"skipped": NO_CUDA}
    steps = args.gpu_steps or (3 if args.quick else 20)
    cells = []
    with tempfile.TemporaryDirectory(prefix="lorapipe-gpu-bench-") as tmp:
        for model in args.gpu_models:
            weights = Path(tmp) / model
            side_process(["--materialize", MODELS[model], "--weights", str(weights)])
            for quant in args.gpu_quant:
                for seq in args.gpu_seqs:
                    cell: dict[str, Any] = {"model": model, "quant": quant, "seq": seq}
                    for side in ("pipeline", "plain"):
                        out = Path(tmp) / f"{model}-{quant}-{seq}-{side}.json"
                        argv = ["--side", side, "--weights", str(weights), "--quant", quant]
                        argv += ["--seq", str(seq), "--steps", str(steps), "--out", str(out)]
                        argv += ["--warmup", str(args.gpu_warmup)]
                        argv += ["--tokens-per-step", str(args.gpu_tokens_per_step)]
                        argv += ["--no-checkpointing"] * args.gpu_no_checkpointing
                        argv += ["--liger"] * args.liger + ["--compile"] * args.compile
                        error = side_process(argv, check=False)
                        cell[side] = {"error": error} if error else json.loads(out.read_text())
                    if "tokens_per_s" in cell["pipeline"] and "tokens_per_s" in cell["plain"]:
                        ratio = cell["pipeline"]["tokens_per_s"] / cell["plain"]["tokens_per_s"]
                        cell["speedup"] = round(ratio, 2)
                    cells.append(cell)
            for f in weights.iterdir():  # 6-16 GB per model: gone before the next one
                f.unlink()
    return {
        "device": machine.name,
        "peak_tflops": machine.peak_tflops,
        "mfu_convention": "4·N·tokens/s / peak (frozen base: forward 2N + backward 2N)",
        "switches": {"liger": args.liger, "compile": args.compile},
        "gradient_checkpointing": not args.gpu_no_checkpointing,
        "cells": cells,
        "summary": summarize(cells),
    }


def side_process(argv: list[str], check: bool = True) -> str | None:
    """Run `python -m bench.gpu_side ARGV`; the last stderr line if it failed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_side", *argv],
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
        out.append(row_text("  MFU", pipe.get("mfu", ""), plain.get("mfu", "")))
        out.append(
            row_text("  peak GB", pipe.get("peak_memory_gb", ""), plain.get("peak_memory_gb", ""))
        )
    return out
