"""`lorapipe lm-eval`: EleutherAI's lm-evaluation-harness on a merged model folder (opt-in).

The harness is the `lmeval` extra; each check that needs no weights (the package, the folder,
the task names) runs before the model loads. Its results become a flat DVC metrics file,
{task: {metric: value}}: stderr, alias and sample counts are left out.
"""

from __future__ import annotations

import difflib
import functools
import math
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorapipe.config import UserError
from lorapipe.io import write_json

if TYPE_CHECKING:  # lm_eval is optional and takes seconds to import
    from lm_eval.tasks import TaskManager

INSTALL = "lm-eval is not installed: pip install -e '.[lmeval]'"
LOCAL_TASKS = Path("configs/lm_eval")  # the project's own tasks, relative to the project root


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(INSTALL) from None


def include_folder(include_path: str | None) -> str | None:
    """--include-path when given (it must be a folder), else configs/lm_eval where present."""
    if include_path is None:
        return str(LOCAL_TASKS) if LOCAL_TASKS.is_dir() else None
    if not Path(include_path).is_dir():
        raise UserError(f"--include-path: {include_path} is not a folder of task YAMLs")
    return include_path


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None) -> TaskManager:
    """lm-eval's index of every task (its own, then include_path's): seconds, built once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def resolve_tasks(text: str, manager: TaskManager, include_path: str | None) -> list[str]:
    """The comma-separated names as lm-eval loads them: a name, a glob (mmlu_*), a YAML file."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError("--tasks: name at least one task, such as sst2_local or mmlu")
    known = manager.all_tasks
    resolved: list[str] = []
    for name in names:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            resolved.append(name)
            continue
        matches = manager.match_tasks([name]) if any(c in name for c in "*?[") else []
        if matches:
            resolved += [m for m in matches if m not in resolved]
            continue
        close = difflib.get_close_matches(name, known, n=3)
        where = f"lm-eval's own or {include_path}'s" if include_path else "lm-eval's own"
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"--tasks: unknown task '{name}' (not among {where} tasks){hint}")
    return resolved


def flatten(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's per-task results → {task: {metric: value}}, numeric and finite only.

    lm-eval keys a metric as "<metric>,<filter>": the default filter ("none") is dropped, any
    other is kept as "<metric>_<filter>"; "<metric>_stderr,<filter>" and non-metric fields go.
    """
    flat: dict[str, dict[str, float]] = {}
    for task, row in results.items():
        metrics: dict[str, float] = {}
        for key, value in row.items():
            metric, comma, filt = key.partition(",")
            if not comma or metric.endswith("_stderr"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            if math.isfinite(value):
                metrics[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
        if metrics:
            flat[task] = metrics
    return flat


def evaluate(
    model: str | Path,
    tasks: list[str],
    manager: TaskManager,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """simple_evaluate with the `hf` model type on `model`: CUDA where present, else the CPU."""
    import lm_eval

    from lorapipe.runtime import detect

    device = detect().accelerator  # the one place that asks torch which device there is
    try:
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model)},
            tasks=tasks,
            device=device,
            batch_size=batch_size,
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
    except FileNotFoundError as exc:  # a local task's data_files, relative to the cwd
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"--tasks: {first} (a local task's data_files are relative to the project root: "
            "run lorapipe lm-eval from there)"
        ) from None
    return flatten(out["results"])


def run(
    model: str | Path,
    tasks: str,
    out: str | Path,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Check, evaluate, write `out` atomically; returns what it wrote."""
    require_lm_eval()
    if limit is not None and limit < 1:
        raise UserError(f"--limit: {limit} must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size: {batch_size} must be at least 1")
    folder = include_folder(include_path)
    manager = task_manager(folder)
    names = resolve_tasks(tasks, manager, folder)
    metrics = evaluate(model, names, manager, limit, batch_size)
    if not metrics:
        raise UserError(f"--tasks: lm-eval reported no numeric metric for {', '.join(names)}")
    write_json(out, metrics)
    return metrics


def summary(metrics: dict[str, dict[str, float]]) -> list[str]:
    return [
        f"{task}: " + ", ".join(f"{name} {value:.4f}" for name, value in sorted(row.items()))
        for task, row in sorted(metrics.items())
    ]
