"""All five stages in one process, under one folder: for tests and benchmarks.

`dvc repro` runs the same library calls one stage script at a time (see dvc.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorapipe.config import Params
from lorapipe.data import tokenize
from lorapipe.evaluation import evaluate
from lorapipe.merge import merge
from lorapipe.modeling import preflight
from lorapipe.plots import plot_training
from lorapipe.runtime import resolve
from lorapipe.training import train


def run_all(p: Params, root: Path) -> dict[str, Any]:
    rt = resolve(p, preflight(p))
    tokenized, adapter, reports = root / "tokenized", root / "adapter", root / "reports"
    meta = tokenize(p, tokenized)
    summary = train(
        p, tokenized, adapter, root / "checkpoint", reports / "train", root / ".work", rt=rt
    )
    metrics = evaluate(
        p, tokenized, adapter, reports / "eval.json", reports / "samples.json", rt=rt
    )
    merged = merge(
        p,
        tokenized,
        adapter,
        root / "merged",
        reports / "merge.json",
        reports / "train" / "metrics.json",
        rt=rt,
    )
    figures = plot_training(reports / "train" / "plots" / "metrics", reports / "figures")
    return {
        "tokenize": meta,
        "train": summary,
        "eval": metrics,
        "merge": merged,
        "figures": figures,
    }
