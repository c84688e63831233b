"""`lorapipe search`: search.yaml → an Optuna study whose trials are `dvc exp run --temp` runs.

The default storage is an Optuna journal file, `.dvc/tmp/search/<study>.journal`: several
processes append to it safely under a file lock (SQLite locks the whole database on each write,
so parallel workers meet "database is locked"), it needs no server, and .dvc/tmp is ignored by
git, so no experiment commit carries it. Any SQLAlchemy URL (sqlite:///, postgresql://, ...)
works too; a journal file on a shared disk or a database server is what other machines join.
"""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorapipe.config import UserError

# Set by a search worker for the train stage (src/lorapipe/trial.py reads them, with the trial's
# name from train.search_trial).
ENV_STORAGE = "LORAPIPE_STORAGE"
ENV_PRUNER = "LORAPIPE_PRUNER"  # JSON: {"metric", "startup_trials", "warmup_evals"}
PRUNED_ATTR = "pruned_at_step"  # the user attr the train stage sets when it stopped early

# Each task's headline metric (lorapipe.tasks' Task.metric, without importing torch for it).
TASK_METRIC = {"seq_cls": "accuracy", "causal_lm": "perplexity", "sft": "perplexity"}
MAXIMIZE = {"accuracy", "gain"}
MINIMIZE = {"perplexity", "loss", "train_seconds", "wall_seconds"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Spec:
    study: str
    objective: str
    direction: str
    trials: int
    storage: str
    params: dict[str, dict[str, Any]]  # key → {"choices": [...]} | {"int"|"float": [lo, hi], "log"}
    fixed: dict[str, Any] = field(default_factory=dict)  # `set:` -S overrides in every trial
    sampler: str = "tpe"
    seed: int | None = 42
    pruner: dict[str, Any] | None = None  # {"metric", "startup_trials", "warmup_evals"}
    stages: tuple[str, ...] = ()  # dvc exp run targets (they and their upstream); () = all


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _number(value: Any, what: str) -> float:
    try:
        return float(value)  # YAML reads 1e-4 (no dot) as a string
    except (TypeError, ValueError):
        raise UserError(f"{what}: {value!r} is not a number") from None


def _check_param(key: str, rule: Any, where: str) -> dict[str, Any]:
    what = f"{where}: params.{key}"
    kinds = [k for k in ("choices", "int", "float") if isinstance(rule, dict) and k in rule]
    if len(kinds) != 1 or set(rule) - {kinds[0], "log"}:
        raise UserError(f"{what}: give one of choices: [...], int: [low, high], float: [low, high]")
    kind = kinds[0]
    if kind == "choices":
        if not isinstance(rule["choices"], list) or not rule["choices"]:
            raise UserError(f"{what}: choices must be a non-empty list")
        return {"choices": rule["choices"]}
    bounds = rule[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise UserError(f"{what}: {kind} must be [low, high]")
    low, high = (_number(b, what) for b in bounds)
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise UserError(f"{what}: int bounds must be whole numbers, got {bounds}")
    if low >= high:
        raise UserError(f"{what}: low ({bounds[0]}) must be below high ({bounds[1]})")
    log = bool(rule.get("log", False))
    if log and low <= 0:
        raise UserError(f"{what}: log: true needs low > 0, got {bounds[0]}")
    cast = int if kind == "int" else float
    return {kind: [cast(low), cast(high)], "log": log}


def known_metrics(repo: Path, task: str) -> dict[str, set[str]]:
    """Metrics file stem → the dotted keys its committed report holds (and the task's own)."""
    stages = (yaml.safe_load((repo / "dvc.yaml").read_text()) or {}).get("stages", {})
    out: dict[str, set[str]] = {}
    for stage in stages.values():
        for entry in stage.get("metrics") or []:
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            proc = subprocess.run(
                ["git", "show", f"HEAD:{path}"], cwd=repo, capture_output=True, text=True
            )
            keys = (
                set(_flatten(yaml.safe_load(proc.stdout) or {})) if proc.returncode == 0 else set()
            )
            out.setdefault(Path(path).stem, set()).update(keys)
    metric = TASK_METRIC[task]
    out.setdefault("eval", set()).update(
        {metric, "gain", *(f"{s}.{metric}" for s in ("tuned", "base"))}
    )
    return out


def _direction(objective: str, task_metric: str) -> str | None:
    leaf = objective.rsplit(".", 1)[-1].split(":")[-1]
    if leaf == "gain":
        leaf = task_metric
    return "maximize" if leaf in MAXIMIZE else "minimize" if leaf in MINIMIZE else None


def resolve_storage(url: str, repo: Path) -> str:
    """Relative journal/SQLite paths → absolute (trials run in another folder)."""
    for prefix in ("journal:", "sqlite:///"):
        if url.startswith(prefix) and not url.startswith(f"{prefix}/"):
            return prefix + str((repo / url[len(prefix) :]).resolve())
    return url


def open_storage(url: str) -> Any:
    """An Optuna storage for `url` (journal:<file> or an SQLAlchemy URL); UserError if not."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    try:
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:"))
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # OSError, SQLAlchemy's errors, an unknown dialect
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"storage: cannot open {url}: {line}") from None


def load_spec(path: Path, repo: Path) -> Spec:
    """search.yaml, checked against params.yaml and the metrics the stages write."""
    from lorapipe.config import load_params

    where = str(path)
    if not path.is_file():
        raise UserError(f"{where}: not found (see search.yaml at the project root)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping")
    extra = set(raw) - {"study", "objective", "direction", "trials", "storage", "sampler", "seed"}
    extra -= {"pruner", "set", "params", "stages"}
    if extra:
        raise UserError(f"{where}: unknown keys {sorted(extra)}")
    known = _flatten(yaml.safe_load((repo / "params.yaml").read_text()) or {})
    known.update({k: None for k in ("lora.rank_pattern", "lora.alpha_pattern")})
    space = raw.get("params") or {}
    if not isinstance(space, dict) or not space:
        raise UserError(f"{where}: params: name at least one params.yaml key to search")
    fixed = raw.get("set") or {}
    for key in [*space, *fixed]:
        if key not in known:
            raise UserError(f"{where}: params.{key} is not a key of params.yaml")
    params = {key: _check_param(key, rule, where) for key, rule in space.items()}
    study = str(raw.get("study", "search"))
    if not NAME.fullmatch(study):
        raise UserError(f"{where}: study: {study!r} must be letters, digits, . _ - (a git ref)")
    trials = raw.get("trials", 20)
    if not isinstance(trials, int) or trials < 1:
        raise UserError(f"{where}: trials must be a whole number >= 1, got {trials!r}")
    task = load_params(repo / "params.yaml").task
    task_metric = TASK_METRIC[task]
    objective = str(raw.get("objective", f"eval:{task_metric}"))
    stem, _, key = objective.partition(":")
    metrics = known_metrics(repo, task)
    if stem not in metrics or key not in metrics[stem]:
        files = ", ".join(sorted(metrics))
        raise UserError(f"{where}: objective: no stage writes {objective} (metrics files: {files})")
    direction = raw.get("direction") or _direction(objective, task_metric)
    if direction not in ("maximize", "minimize"):
        raise UserError(f"{where}: direction: say maximize or minimize for {objective}")
    sampler = str(raw.get("sampler", "tpe"))
    if sampler not in ("tpe", "random"):
        raise UserError(f"{where}: sampler: {sampler!r} is not one of tpe, random")
    pruner = raw.get("pruner", {})
    if pruner is not None:
        unknown = set(pruner) - {"metric", "startup_trials", "warmup_evals"}
        if unknown:
            raise UserError(f"{where}: pruner: unknown keys {sorted(unknown)}")
        leaf = "loss" if key.rsplit(".", 1)[-1] in ("perplexity", "loss") else key.rsplit(".")[-1]
        pruner = {"metric": f"eval_{leaf}", "startup_trials": 2, "warmup_evals": 2} | pruner
    targets = raw.get("stages") or []
    in_dvc = (yaml.safe_load((repo / "dvc.yaml").read_text()) or {}).get("stages", {})
    for target in targets:
        if target not in in_dvc:
            raise UserError(f"{where}: stages: {target!r} is not a stage of dvc.yaml")
    storage = str(raw.get("storage") or f"journal:.dvc/tmp/search/{study}.journal")
    spec = Spec(
        study=study,
        objective=objective,
        direction=direction,
        trials=trials,
        storage=resolve_storage(storage, repo),
        params=params,
        fixed=fixed,
        sampler=sampler,
        seed=raw.get("seed", 42),
        pruner=pruner,
        stages=tuple(targets),
    )
    open_storage(spec.storage)  # unreachable: one line now, before any trial
    return spec


def distributions(spec: Spec) -> dict[str, Any]:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for key, rule in spec.params.items():
        if "choices" in rule:
            out[key] = CategoricalDistribution(rule["choices"])
        elif "int" in rule:
            out[key] = IntDistribution(*rule["int"], log=rule["log"])
        else:
            out[key] = FloatDistribution(*rule["float"], log=rule["log"])
    return out


def _yaml_value(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"params: {value} cannot be set")
    if isinstance(value, float):
        text = repr(value)  # 1e-05 is a string to YAML 1.1 (PyYAML): write 1.0e-05
        return re.sub(r"^(-?\d+)e", r"\1.0e", text)
    return (
        yaml.safe_dump(value, default_flow_style=True, width=1 << 20)
        .removesuffix("\n...\n")
        .strip()
    )


def set_args(values: dict[str, Any]) -> list[str]:
    """{"lora.r": 8, "train.learning_rate": 1e-4} → ["-S", "lora.r=8", "-S", ...]."""
    out: list[str] = []
    for key, value in values.items():
        out += ["-S", f"{key}={_yaml_value(value)}"]
    return out


def error_line(stderr: str, returncode: int) -> str:
    """The last `error:` line a stage printed, else the last line, else the exit code."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]  # not dvc's "ERROR:"
    return (errors or lines or [f"dvc exp run exited with code {returncode}"])[-1]
