"""Overheads: a no-op `dvc repro`, and tokenizing the full 67,349-row SST-2 train set."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import ROOT, SST2_FULL
from lorapipe.config import Params
from lorapipe.data_sources import load_rows
from lorapipe.modeling import load_tokenizer
from lorapipe.tasks import get_task


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
