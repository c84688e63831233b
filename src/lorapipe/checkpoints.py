"""Trainer checkpoints: when they are written, and which one a killed run resumes from.

With early stopping, one is written at every eval and Trainer loads the best back at the end.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from safetensors import safe_open

from lorapipe.config import Params, UserError
from lorapipe.sections_run import best_model_metric

CHECKPOINT_FILES = (
    "trainer_state.json",
    "optimizer.pt",
    "scheduler.pt",
    "adapter_model.safetensors",
)


def saving(p: Params, eval_strategy: str) -> dict[str, Any]:
    """TrainingArguments' checkpoint fields: every train.save_steps and at the last step.

    With early stopping: at every eval instead (Trainer requires the two strategies to match,
    and config requires save_steps = eval_steps), the best by train.early_stopping_metric loaded
    back at the end; a resumed run keeps the patience count its checkpoint recorded.
    """
    t = p.train
    if t.early_stopping_patience is None:
        return {"save_strategy": "steps", "save_steps": t.save_steps}
    if eval_strategy == "no":
        raise UserError("train.early_stopping_patience: the tokenized data has no eval split")
    metric = best_model_metric(p.task, t.early_stopping_metric)
    return {
        "save_strategy": eval_strategy,
        "save_steps": t.save_steps,
        "load_best_model_at_end": True,
        "metric_for_best_model": metric,
        "greater_is_better": not metric.endswith(("loss", "perplexity")),
        "restore_callback_states_from_checkpoint": True,
    }


def checkpoint_ok(folder: Path) -> bool:
    """A checkpoint is usable only if every file was written completely."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
        with safe_open(folder / "adapter_model.safetensors", "pt") as f:
            list(f.keys())
        return all((folder / name).stat().st_size > 0 for name in CHECKPOINT_FILES)
    except Exception:  # any unreadable file, whatever the reader raises, means incomplete
        return False


def latest_checkpoint(work: Path) -> Path | None:
    candidates = sorted(work.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[-1]))
    for folder in reversed(candidates):
        if checkpoint_ok(folder):
            return folder
        warnings.warn(f"skipping incomplete checkpoint {folder}", stacklevel=2)
    return None
