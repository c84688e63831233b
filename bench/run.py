"""Benchmark: this pipeline against the tutorial style, and its precision and GPU choices.

    python bench/run.py            # every section (~13 min on 2 idle cores + precision's runs)
    python bench/run.py --quick    # a smoke run (a few minutes); its numbers are not meaningful
    python bench/run.py --only precision     # some sections only
    python bench/run.py --only gpu --gpu-device cpu   # the gpu section's sides on tiny models

Everything runs on the same machine, with the same rows, model and seed on both sides of each
comparison. One module per section (bench/<section>.py), the shared parts in bench/harness.py,
the targets, table and chart in bench/report.py; SECTIONS below says what runs.

Writes reports/bench.json and reports/bench.png (not reports/figures: a DVC stage owns it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets
import torch
import transformers

from bench import causal, classification, generation, gpu, overheads, precision
from bench.harness import ROOT, cpu_busy_fraction, not_run
from bench.report import chart, table, targets
from lorapipe.config import Params, load_params
from lorapipe.runtime import detect


@dataclass(frozen=True)
class Section:
    """One part of the benchmark. A new module plugs in with one entry in SECTIONS."""

    run: Callable[[argparse.Namespace, Params], dict[str, Any]]
    # Its lines in the printed table, when report.table does not format it itself.
    lines: Callable[[dict[str, Any]], list[str]] | None = None
    # Its own command-line flags (sizes default from --quick inside the section).
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


SECTIONS: dict[str, Section] = {
    "classification": Section(classification.classification),
    "causal_lm": Section(lambda args, p: causal.causal(args)),
    "noop_repro": Section(lambda args, p: overheads.noop_repro(args.repro_runs)),
    "sst2_tokenize": Section(lambda args, p: overheads.sst2_tokenize(p)),
    "precision": Section(precision.run, precision.lines, precision.add_arguments),
    "generation": Section(generation.run, generation.lines, generation.add_arguments),
    "gpu": Section(gpu.run, gpu.lines, gpu.add_arguments),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--train-rows", type=int, help="classification train rows (3000)")
    parser.add_argument("--eval-rows", type=int, help="classification dev rows (all 872)")
    parser.add_argument("--epochs", type=float, default=1.0, help="classification epochs")
    parser.add_argument("--batch-size", type=int, help="classification batch (params.yaml's)")
    parser.add_argument("--causal-steps", type=int, help="causal optimizer steps per side (6)")
    parser.add_argument("--causal-batch", type=int, help="causal batch size (4)")
    parser.add_argument("--causal-length", type=int, default=256, choices=causal.CAUSAL_LENGTHS)
    parser.add_argument("--heldout-blocks", type=int, help="causal perplexity blocks (16)")
    parser.add_argument("--repro-runs", type=int, help="no-op repro repeats, median kept (3)")
    for section in SECTIONS.values():
        if section.add_arguments:
            section.add_arguments(parser)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(SECTIONS),
        default=list(SECTIONS),
        help="run these sections only (the others are reported as not selected)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's own, one per core); 1 on a machine shared with "
        "other jobs, where threads that wait on each other add seconds to every step",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench.json")
    parser.add_argument("--png", type=Path, default=ROOT / "reports" / "bench.png")
    args = parser.parse_args(argv)
    # Flags given explicitly win; the rest depend on --quick.
    quick = {"train_rows": 64, "eval_rows": 64, "causal_steps": 2, "causal_batch": 1}
    full = {"train_rows": 3000, "eval_rows": None, "causal_steps": 6, "causal_batch": 4}
    quick["heldout_blocks"], full["heldout_blocks"] = 2, 16
    quick["repro_runs"], full["repro_runs"] = 1, 3
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.causal_steps < 2:
        parser.error("--causal-steps must be at least 2 (the first step is not timed)")
    return args


def quiet() -> None:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # Harmless here, and they would bury the table: the library's pack collator sets max_length
    # with padding=True; pin_memory on a CPU-only machine; PEFT asks a deprecated attribute.
    warnings.filterwarnings("ignore", message="`max_length` is ignored when `padding`=`True`")
    warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    # params.yaml is read once, up front: the sections then agree even if it is edited mid-run.
    p = load_params(ROOT / "params.yaml").model_copy(update={"task": "seq_cls"})
    started = time.perf_counter()
    machine = detect()
    result: dict[str, Any] = {
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_busy_before_start": cpu_busy_fraction(),  # 0..1, other processes
            "cuda": machine.name if machine.accelerator == "cuda" else None,
            "cpu_bf16": machine.bf16 if machine.accelerator == "cpu" else None,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "section_seconds": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, section in SECTIONS.items():
        if name not in args.only:
            result[name] = {"skipped": "not selected (--only)"}
            continue
        print(f"{name} ...", end=" ", flush=True)
        start = time.perf_counter()
        try:
            result[name] = section.run(args, p)
        except Exception as exc:  # one failed section must not cost the others' minutes
            result[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
        result["section_seconds"][name] = round(time.perf_counter() - start, 1)
        print(f"{result['section_seconds'][name]} s", flush=True)
        # Written after every section, so that an interrupted run keeps what it measured.
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    result["targets"] = targets(result)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    chart(result, args.png)

    extra = {
        name: [] if not_run(result[name]) else s.lines(result[name])
        for name, s in SECTIONS.items()
        if s.lines
    }
    print()
    print(table(result, extra))
    busy = result["machine"]["cpu_busy_before_start"]
    if busy is not None and busy > 0.25:
        print(
            f"\nnote: other work kept the CPUs {busy:.0%} busy when this run started; "
            "timings are pessimistic, and with several torch threads a busy machine "
            "adds a fixed cost to every step, which hides most of the short-batch gain. Rerun "
            "on an idle machine, or with --threads 1."
        )
    if args.quick:
        print("\n(--quick: tiny sizes; the numbers are a smoke test, not a measurement)")
    print(f"\nwrote {args.out} and {args.png} in {result['total_seconds']} s")


if __name__ == "__main__":
    main()
