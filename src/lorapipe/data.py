"""The tokenize stage's library: rows → token ids on disk (Arrow), no padding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from lorapipe.config import Params, stage_params
from lorapipe.io import atomic_dir, write_json
from lorapipe.modeling import check_max_length, load_config, load_tokenizer
from lorapipe.sources import load_rows
from lorapipe.tasks import get_task

TOKENIZE_KEYS = [
    "task",
    "model.name",
    "model.trust_remote_code",
    "tokenize.max_length",
    "tokenize.layout",
    *(
        f"data.{k}"
        for k in (
            "train",
            "eval",
            "eval_fraction",
            "text_field",
            "label_field",
            "num_labels",
            "format",
            "input_field",
            "output_field",
            "separator",
            "chat_template",
            "max_train_rows",
            "max_eval_rows",
        )
    ),
    "train.seed",
]


def _split(p: Params) -> tuple[datasets.Dataset, datasets.Dataset]:
    train = load_rows(p.data.train, "data.train")
    if p.data.eval:
        return train, load_rows(p.data.eval, "data.eval")
    # A fixed, seeded hold-out: the same rows whenever the params are the same.
    parts = train.train_test_split(test_size=p.data.eval_fraction, seed=p.train.seed)
    return parts["train"], parts["test"]


def _head(rows: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return rows.select(range(min(limit, len(rows)))) if limit else rows


def tokenize(p: Params, out: Path) -> dict[str, Any]:
    """Tokenize train and eval into `out` (a DatasetDict) with a meta.json of what made it."""
    check_max_length(p, load_config(p))
    task, tok = get_task(p.task), load_tokenizer(p)
    train_rows, eval_rows = _split(p)
    train = task.tokenize(_head(train_rows, p.data.max_train_rows), tok, p, "data.train")
    evaluation = task.tokenize(_head(eval_rows, p.data.max_eval_rows), tok, p, "data.eval")
    # Evaluation in length order: batches of similar lengths carry little padding.
    evaluation = evaluation.sort("length")
    meta = {
        "params": stage_params(p, TOKENIZE_KEYS),
        "rows": {"train": len(train), "eval": len(evaluation)},
        "tokens": {"train": sum(train["length"]), "eval": sum(evaluation["length"])},
    }
    splits = {"train": train, "eval": evaluation}
    if p.task == "causal_lm":  # the eval text in order, for evaluate.perplexity: sliding_window
        eval_head = _head(eval_rows, p.data.max_eval_rows)
        splits["eval_stream"] = task.stream(eval_head, tok, p, "data.eval")
    with atomic_dir(out) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        write_json(tmp / "meta.json", meta)
    return meta
