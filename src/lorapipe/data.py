"""The tokenize stage's library: rows → token ids on disk (Arrow), no padding."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets

from lorapipe.chat import CONVERSATION_COLUMN
from lorapipe.config import Params, UserError, stage_params
from lorapipe.data_sources import LINE, at, check_data, load_rows, require_columns, task_columns
from lorapipe.io import atomic_dir, write_json
from lorapipe.modeling import check_max_length, load_config, load_tokenizer
from lorapipe.tasks import get_task

log = logging.getLogger(__name__)

TOKENIZE_KEYS = ["task", "model", "tokenize", "data", "train.seed"]


def _split(p: Params) -> tuple[datasets.Dataset, datasets.Dataset]:
    train = load_rows(p.data.train, "data.train")
    if p.data.eval:
        return train, load_rows(p.data.eval, "data.eval")
    # A fixed, seeded hold-out: the same rows whenever the params are the same.
    parts = train.train_test_split(test_size=p.data.eval_fraction, seed=p.train.seed)
    return parts["train"], parts["test"]


def _head(rows: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return rows.select(range(min(limit, len(rows)))) if limit else rows


def _text_columns(p: Params) -> list[str]:
    """Columns of plain text (not labels; a conversation column is checked turn by turn in chat)."""
    skip = set(CONVERSATION_COLUMN.values())
    if p.data.label_names:  # the output column holds label indices (chat.pairs checks them)
        skip.add(p.data.output_field)
    return [c for c, key in task_columns(p).items() if key != "data.label_field" and c not in skip]


def _drop_blank(rows: datasets.Dataset, p: Params, where: str) -> tuple[datasets.Dataset, int]:
    """Rows whose text is only whitespace would train on special tokens alone: drop, count."""
    require_columns([c for c in rows.column_names if c != LINE], p, where)
    keep, blank = [True] * len(rows), set()
    for column in _text_columns(p):
        for i, text in enumerate(rows[column][:]):
            if not isinstance(text, str):
                raise UserError(f"{where}: {at(rows, i)}: '{column}' is {text!r}, not text")
            if not text.strip():
                keep[i] = False
                blank.add(column)
    dropped = keep.count(False)
    if dropped == len(rows):
        raise UserError(f"{where}: every row's {' / '.join(_text_columns(p))} is blank")
    if dropped:
        first = at(rows, keep.index(False))
        columns = " or ".join(f"'{c}'" for c in _text_columns(p) if c in blank)
        log.info(
            "%s: dropped %d of %d rows whose %s is blank (first: %s)",
            where,
            dropped,
            len(rows),
            columns,
            first,
        )
        rows = rows.select([i for i, k in enumerate(keep) if k])
    return rows, dropped


def _in_train(train: datasets.Dataset, evaluation: datasets.Dataset, p: Params) -> int:
    """How many eval rows also appear verbatim in train (leakage: eval would flatter the model)."""
    columns = _text_columns(p)
    seen = set(zip(*(train[c][:] for c in columns), strict=True))
    return sum(row in seen for row in zip(*(evaluation[c][:] for c in columns), strict=True))


def tokenize(p: Params, out: Path) -> dict[str, Any]:
    """Tokenize train and eval into `out` (a DatasetDict) with a meta.json of what made it."""
    check_data(p)  # a missing file or column in one line, before the model's config loads
    check_max_length(p, load_config(p))
    task, tok = get_task(p.task), load_tokenizer(p)
    train_rows, eval_rows = _split(p)
    train_rows, train_blank = _drop_blank(train_rows, p, "data.train")
    eval_rows, eval_blank = _drop_blank(eval_rows, p, "data.eval")
    train_rows = _head(train_rows, p.data.max_train_rows)
    eval_rows = _head(eval_rows, p.data.max_eval_rows)
    leaked = _in_train(train_rows, eval_rows, p)
    if leaked:
        log.warning(
            "data.eval: %d of %d eval rows also appear verbatim in data.train: eval metrics "
            "flatter the model",
            leaked,
            len(eval_rows),
        )
    fit: dict[str, dict[str, int]] = {"train": {}, "eval": {}}  # what max_length cost each split
    train = task.tokenize(train_rows, tok, p, "data.train", fit["train"])
    evaluation = task.tokenize(eval_rows, tok, p, "data.eval", fit["eval"])
    # Evaluation in length order: batches of similar lengths carry little padding.
    evaluation = evaluation.sort("length")
    meta = {
        "params": stage_params(p, TOKENIZE_KEYS),
        "rows": {"train": len(train), "eval": len(evaluation)},
        "tokens": {"train": sum(train["length"]), "eval": sum(evaluation["length"])},
        "dropped_blank_rows": {"train": train_blank, "eval": eval_blank},
        "eval_rows_in_train": leaked,
    }
    if fit["train"] or fit["eval"]:
        meta["max_length_fit"] = fit
    splits = {"train": train, "eval": evaluation}
    meta |= task.split_meta(splits, p)
    splits |= task.extra_splits(eval_rows, tok, p)
    with atomic_dir(out) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        write_json(tmp / "meta.json", meta)
    return meta
