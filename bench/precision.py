"""Precision on a CPU: does bf16 autocast pay for `train.mixed_precision: auto`?

MiniLM + LoRA through the train stage on the same 3,000 seeded SST-2 rows (94 steps of 32: fewer
stay on the majority-class plateau), fp32 against bf16 autocast
(train.mixed_precision: bf16), sides interleaved (fp32, bf16, fp32, bf16, ...) so that a change
in the shared machine's load hits both; the median samples/s of each side is kept. Both are
scored on dev by the evaluate stage's loop under the autocast training used.

Decision: bf16 where it is faster at no more than 0.5 point of dev
accuracy, else fp32. "Faster" means at least PAYS x: a smaller gain is within what this shared
machine's load moves between two runs of one side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import (
    pipeline_train,
    release,
    row_text,
    runtime,
    score,
    side_result,
    sst2_subset,
)
from lorapipe.config import Params
from lorapipe.hardware import measure
from lorapipe.modeling import load_tokenizer
from lorapipe.runtime import autocast, detect, resolve

PAYS = 1.10  # bf16 / fp32 samples/s, at least
MAX_DROP_POINTS = 0.5  # dev accuracy, at most this far below fp32
SIDES = {"fp32": "no", "bf16": "bf16"}  # side -> train.mixed_precision


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision-rows", type=int, help="precision train rows (3000)")
    parser.add_argument(
        "--precision-repeats", type=int, help="runs of each side, interleaved (2; quick 1)"
    )


def decide(fp32: dict[str, Any], bf16: dict[str, Any], majority: float = 0.5) -> dict[str, Any]:
    """The verdict from each side's median samples/s and dev accuracy.

    Equal accuracies at the majority-class rate (a run too short to learn) prove nothing about
    precision: then the decision stays fp32 and says why.
    """
    speedup = round(bf16["samples_per_s"] / fp32["samples_per_s"], 2)
    drop = round(100 * (fp32["accuracy"] - bf16["accuracy"]), 2)
    learned = max(fp32["accuracy"], bf16["accuracy"]) > majority + 0.02
    pays = speedup >= PAYS and drop <= MAX_DROP_POINTS and learned
    out = {
        "bf16_speedup": speedup,
        "accuracy_drop_points": 0.0 + drop,  # 0.0 + x: no "-0.0" in the report
        "criterion": f"bf16 if speedup >= {PAYS}x and drop <= {MAX_DROP_POINTS} pt",
        "decision": "bf16" if pays else "fp32",
    }
    if not learned:
        out["note"] = "inconclusive: both sides near the majority-class rate"
    return out


def runtime_choice(p: Params) -> dict[str, Any]:
    """What `train.mixed_precision: auto` resolves to here (from the runtime's cached
    measurement), beside the same micro-benchmark run again now."""
    auto = p.model_copy(update={"train": p.train.model_copy(update={"mixed_precision": "auto"})})
    rt = resolve(auto, None, detect())
    return {
        "runtime_auto": rt.mixed_precision,
        "runtime_reason": rt.reasons["mixed_precision"],
        "micro_benchmark_now": {k: v for k, v in vars(measure()).items() if k != "source"},
    }


def run(args: argparse.Namespace, p: Params) -> dict[str, Any]:
    machine = detect()
    if machine.accelerator != "cpu":
        return {"skipped": "a CPU question (on a GPU the runtime table decides: bf16 if it has it)"}
    if not machine.bf16:
        return {"skipped": "this CPU has no native bf16 (avx512_bf16 / amx_bf16)"} | (
            runtime_choice(p)
        )
    n_rows = args.precision_rows or (64 if args.quick else 3000)
    repeats = args.precision_repeats or (1 if args.quick else 2)
    train_update = {"epochs": 1.0, "batch_size": 32, "eval_strategy": "no"}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # once: both sides train on the same tokenized rows
        p, rows, dev = sst2_subset(p, n_rows, 64 if args.quick else None, train_update, root)
        tok = load_tokenizer(p)
        tokenized = root / "tokenized"
        for i in range(repeats):
            for side, mixed in SIDES.items():
                ps = p.model_copy(
                    update={"train": p.train.model_copy(update={"mixed_precision": mixed})}
                )
                meter, model = pipeline_train(ps, tokenized, root / f"{side}-{i}")
                out = side_result(meter, meter.end - meter.start)
                with autocast(runtime(ps)):  # as the evaluate stage scores it
                    out["accuracy"] = round(score(ps, model, dev, tok)["accuracy"], 4)
                runs[side].append(out)
                del model
                release()
    positive = sum(dev["labels"][:]) / len(dev)
    majority = max(positive, 1 - positive)
    sides = {}
    for side, results in runs.items():
        sides[side] = {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in results),
            "samples_per_s_runs": [r["samples_per_s"] for r in results],
            "seconds_runs": [r["seconds"] for r in results],
            # Seeded: every run of a side should score the same; the first is kept.
            "accuracy": results[0]["accuracy"],
            "accuracy_runs": [r["accuracy"] for r in results],
        }
    return {
        "model": p.model.name,
        "train_rows": len(rows),
        "eval_rows": len(dev),
        "batch_size": 32,
        "repeats": repeats,
        **sides,
        "majority_class_accuracy": round(majority, 4),
        **decide(sides["fp32"], sides["bf16"], majority),
        **runtime_choice(p),
    }


def lines(section: dict[str, Any]) -> list[str]:
    fp32, bf16 = section["fp32"], section["bf16"]
    return [
        f"Precision on this CPU ({section['train_rows']} rows, batch {section['batch_size']}, "
        f"{section['repeats']} interleaved runs per side, median)",
        row_text("", "fp32", "bf16 autocast", "ratio"),
        row_text(
            "train samples/s", fp32["samples_per_s"], bf16["samples_per_s"], section["bf16_speedup"]
        ),
        row_text(f"dev accuracy ({section['eval_rows']} rows)", fp32["accuracy"], bf16["accuracy"]),
        f"  decision for mixed_precision auto on a CPU: {section['decision']} "
        f"({section['criterion']}){'; ' + section['note'] if 'note' in section else ''}",
        f"  the runtime's auto on this CPU: {section['runtime_auto']} "
        f"({section['runtime_reason']})",
        "  its micro-benchmark again now: fp32 {fp32_gflops} vs bf16 {bf16_gflops} GFLOP/s, "
        "{speedup}x, {seconds} s".format(**section["micro_benchmark_now"]),
    ]
