"""Where a data set comes from, and its columns checked before any model loads: a local file
(.tsv, .csv, .jsonl, .json, .txt), Python's own Language Reference (`pydoc:topics` as text,
`pydoc:qa` as question → answer pairs), or a hub data set `hf:<id>[:<config>]:<split>` (e.g.
`hf:glue:sst2:train`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import string
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from lorapipe.config import Params, UserError, text_position
from lorapipe.hub import hub_reachable, offline_error

if TYPE_CHECKING:  # datasets and pandas load inside the functions: `lorapipe check` stays fast
    import datasets
    import pandas as pd

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".txt")


def read_text_file(path: Path, field: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        where = text_position(path, exc.start)
        raise UserError(f"{field}: {path}: not UTF-8 text at {where}") from None


def local_file(source: str, field: str) -> Path:
    """A data file that exists, is a file and has a type we read; else one line saying which."""
    path = Path(source)
    if path.is_dir():
        raise UserError(f"{field}: {source} is a directory; name a file in it")
    if not path.is_file():
        raise UserError(f"{field}: file not found: {source}")
    if path.suffix not in DATA_SUFFIXES:
        raise UserError(
            f"{field}: {source}: unsupported file type (use {', '.join(DATA_SUFFIXES)})"
        )
    return path


PYDOC_COLUMNS = {"pydoc:topics": ["text"], "pydoc:qa": ["input", "output"]}
# The params that name the columns each task reads.
TASK_FIELDS = {
    "seq_cls": ("text_field", "label_field"),
    "causal_lm": ("text_field",),
    "sft": ("input_field", "output_field"),
}


# sft's other data.format values read fixed column names (lorapipe.chat).
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
}


def task_columns(p: Params) -> dict[str, str]:
    """{column name: the params key that names it} for the columns the task needs."""
    if p.task == "sft" and p.data.format in FORMAT_COLUMNS:
        return {column: "data.format" for column in FORMAT_COLUMNS[p.data.format]}
    columns = {getattr(p.data, key): f"data.{key}" for key in TASK_FIELDS[p.task]}
    if p.task == "sft" and p.data.input_template is not None:  # the prompt from these instead
        del columns[p.data.input_field]
        named = string.Formatter().parse(p.data.input_template)
        columns.update({f: "data.input_template" for _, f, _, _ in named if f})
    return columns


def require_columns(columns: list[str], p: Params, where: str) -> None:
    for column, key in task_columns(p).items():
        if column not in columns:
            raise UserError(f"{where}: no '{column}' column (set {key}; columns: {columns})")


def _header(path: Path, text: str, field: str) -> list[str]:
    """The column names of a data file, from its first line or record: no full parse."""
    if path.suffix == ".txt":
        return ["text"]
    if path.suffix in (".tsv", ".csv"):
        first = text.split("\n", 1)[0].rstrip("\r").lstrip("\ufeff")  # pandas drops a BOM
        return next(csv.reader([first], delimiter="\t" if path.suffix == ".tsv" else ","))
    try:
        if path.suffix == ".jsonl":
            record = json.loads(next(line for line in text.splitlines() if line.strip()))
        else:
            record = json.loads(text)
            record = record[0] if isinstance(record, list) and record else record
    except (json.JSONDecodeError, StopIteration) as exc:
        raise UserError(f"{field}: {path}: cannot parse: {str(exc).splitlines()[0]}") from None
    return list(record) if isinstance(record, dict) else []


def check_data(p: Params) -> list[str]:
    """What `lorapipe check` says about data.train/data.eval: each exists, is UTF-8 text and has
    the columns the task needs. Cheap: no tokenizer, no full parse. Hub data sets are not read."""
    notes = []
    for field, source in (("data.train", p.data.train), ("data.eval", p.data.eval)):
        if source is None:
            continue
        if source in PYDOC_COLUMNS:
            require_columns(PYDOC_COLUMNS[source], p, field)
            notes.append(f"{field}: {source}")
            continue
        if source.startswith("hf:"):
            notes.append(f"{field}: {source} (a hub data set: not read by check)")
            continue
        path = local_file(source, field)
        text = read_text_file(path, field)
        if not text.strip():
            raise UserError(f"{field}: {source}: file is empty")
        require_columns(_header(path, text, field), p, field)
        lines = text.count("\n")
        notes.append(f"{field}: {source} ({lines} lines)")
    return notes


def _pydoc_paragraphs() -> dict[str, list[str]]:
    from pydoc_data.topics import topics

    return {
        key: [p.strip() for p in topics[key].split("\n\n") if p.strip()] for key in sorted(topics)
    }


def _pydoc_source(name: str) -> datasets.Dataset:
    """pydoc:topics: the reference's paragraphs as `text`; pydoc:qa: topic question → answer."""
    import datasets

    paragraphs = _pydoc_paragraphs()
    if name == "topics":
        return datasets.Dataset.from_dict({"text": [p for ps in paragraphs.values() for p in ps]})
    qa = {"input": [], "output": []}
    for ps in paragraphs.values():
        answer = next((p for p in ps[1:] if len(p) > 80), None)  # ps[0] is the title
        if answer:
            title = ps[0].splitlines()[0]
            qa["input"].append(f"What does the Python Language Reference say about {title}?")
            qa["output"].append(answer[:600])
    return datasets.Dataset.from_dict(qa)


LINE = "__line__"  # each row's line in its file, kept through the split and the shuffle


def at(rows: datasets.Dataset, i: int) -> str:
    """Where row `i` of `rows` came from, for an error: its file's own line where known."""
    if LINE in rows.column_names:
        return f"line {rows[i][LINE]}"
    return f"row {i + 1}"


def _jsonl(path: Path, text: str, field: str) -> pd.DataFrame:
    """JSON Lines parsed line by line, so a parse error names its line, not a byte offset."""
    import pandas as pd

    records, lines = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{field}: {path}: line {n}: cannot parse: {exc.msg}") from None
        if not isinstance(records[-1], dict):
            raise UserError(f"{field}: {path}: line {n}: not a JSON object")
        lines.append(n)
    frame = pd.DataFrame.from_records(records)
    frame[LINE] = lines
    return frame


def _data_lines(text: str, rows: int) -> list[int] | None:
    """The file lines of a TSV/CSV's rows (after the header; pandas skips empty lines), or None
    where a quoted field spans lines and the count does not match."""
    lines = [n for n, line in enumerate(text.splitlines(), 1) if line][1:]
    return lines if len(lines) == rows else None


def load_rows(source: str, field: str) -> datasets.Dataset:
    """Rows of a data source as a Dataset (columns as in the source; text files: `text`). Rows
    of a local file carry their line in column LINE, for errors that name the file's line."""
    import datasets
    import pandas as pd

    if source in ("pydoc:topics", "pydoc:qa"):
        return _pydoc_source(source.removeprefix("pydoc:"))
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        if len(parts) not in (2, 3):
            raise UserError(f"{field}: '{source}' should be hf:<id>[:<config>]:<split>")
        repo_id, config, split = parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]
        if not hub_reachable():
            os.environ["HF_DATASETS_OFFLINE"] = "1"  # only the local datasets cache can answer
        try:
            return datasets.load_dataset(repo_id, config, split=split)
        except Exception as exc:  # datasets raises many types; the user needs the one line
            if not hub_reachable():
                raise offline_error(
                    field,
                    "dataset",
                    source,
                    "download it where there is internet, or use a local file",
                ) from None
            raise UserError(
                f"{field}: cannot load '{source}': {str(exc).splitlines()[0]}"
            ) from None
    path = local_file(source, field)
    text = read_text_file(path, field)
    if not text.strip():
        raise UserError(f"{field}: {source}: file is empty")
    if path.suffix == ".txt":
        lines = text.splitlines()
        return datasets.Dataset.from_dict({"text": lines, LINE: list(range(1, len(lines) + 1))})
    if path.suffix == ".jsonl":
        frame = _jsonl(path, text, field)
        if frame.empty:
            raise UserError(f"{field}: {source}: no rows")
        return datasets.Dataset.from_pandas(frame, preserve_index=False)
    try:
        if path.suffix == ".json":
            frame = pd.read_json(path, dtype=False)
        else:
            # QUOTE_NONE: SST-2 sentences contain bare quote characters.
            sep = "\t" if path.suffix == ".tsv" else ","
            quoting = 3 if path.suffix == ".tsv" else 0
            frame = pd.read_csv(path, sep=sep, quoting=quoting, keep_default_na=False, dtype=str)
            lines = _data_lines(text, len(frame))
            if lines:
                frame[LINE] = lines
    except ValueError as exc:
        raise UserError(f"{field}: {source}: cannot parse: {str(exc).splitlines()[0]}") from None
    if frame.empty:
        raise UserError(f"{field}: {source}: no rows")
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def label_counts(labels: list[int], num_labels: int, where: str) -> dict[str, int]:
    """{label: rows}; a loud warning for a class that is missing or under 1 %."""
    counts = Counter(labels)
    total = len(labels)
    shares = ", ".join(
        f"{k}: {counts[k]} ({100 * counts[k] / total:.1f} %)" for k in sorted(counts)
    )
    log.info("%s labels: %s", where, shares)
    for label in range(num_labels):
        if counts[label] == 0:
            log.warning(
                "%s: label %d has no rows of %d: %s",
                where,
                label,
                total,
                "the model cannot learn it" if where == "data.train" else "eval cannot score it",
            )
        elif counts[label] < 0.01 * total:
            log.warning(
                "%s: label %d has %d of %d rows (under 1 %%)", where, label, counts[label], total
            )
    return {str(k): counts[k] for k in range(num_labels)}


def require_column(rows: datasets.Dataset, column: str, key: str, where: str) -> None:
    if column not in rows.column_names:
        raise UserError(f"{where}: no '{column}' column (set {key}; columns: {rows.column_names})")


def column_texts(rows: datasets.Dataset, column: str, where: str) -> list[str]:
    texts = rows[column][:]  # a list; list(Column) reads row by row (~2 s per 67k rows)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"{where}: {at(rows, i)}: '{column}' is {text!r}, not text")
    return texts
