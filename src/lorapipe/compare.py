"""`dvc exp show --json` → one table (params, metrics, train time), a seed-noise band, a PNG.

A failed, queued or running experiment is shown with its state and no metrics: `dvc exp show`
fills such a row with its baseline's metrics, which are not its own.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

LOSS_TSV = "reports/train/plots/metrics/loss.tsv"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


SEED = "train.seed"


def _row(entry: dict[str, Any], name: str, state: str = "success") -> dict[str, Any]:
    data = entry.get("data") or {}
    params = _flatten((data.get("params") or {}).get("params.yaml", {}).get("data", {}))
    if entry.get("error"):
        state = "failed"
    metrics: dict[str, Any] = {}
    for path, content in (data.get("metrics") or {}).items() if state == "success" else ():
        flat = _flatten(content.get("data", {}))
        metrics.update({f"{Path(path).stem}:{k}": v for k, v in flat.items()})
    return {"name": name, "rev": entry["rev"], "state": state, "params": params, "metrics": metrics}


def parse_exp_show(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Baselines and their experiments, in `dvc exp show` order (workspace first)."""
    rows = []
    for baseline in records:
        rev = baseline["rev"]
        rows.append(
            _row(baseline, baseline.get("name") or (rev if rev == "workspace" else rev[:7]))
        )
        for exp in baseline.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state") or "success"
            for rev in exp.get("revs") or []:
                name = exp.get("name") or rev.get("name") or rev["rev"][:7]
                rows.append(_row(rev, name, state))
    return rows


def experiments(repo: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=repo, capture_output=True, text=True, check=True
    )
    return parse_exp_show(json.loads(proc.stdout))


def table(rows: list[dict[str, Any]], params: list[str], metrics: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "experiment": r["name"],
                **{p: r["params"].get(p) for p in params},
                **{m: r["metrics"].get(m) for m in metrics},
                **({"state": r["state"]} if any(x["state"] != "success" for x in rows) else {}),
            }
            for r in rows
        ]
    )


def noise_band(rows: list[dict[str, Any]], metric: str) -> pd.DataFrame:
    """Mean ± std of `metric` over experiments that differ only in train.seed.

    One row per configuration run under two or more seeds: a difference between two
    configurations means something only beyond these bands. The workspace is left out (it
    repeats its baseline); a run listed twice under one seed counts once.
    """
    groups: dict[str, list[float]] = {}
    seeds: dict[str, list[Any]] = {}
    for r in rows:
        value = r["metrics"].get(metric)
        if r["state"] != "success" or value is None or r["rev"] == "workspace":
            continue
        config = json.dumps({k: v for k, v in r["params"].items() if k != SEED}, sort_keys=True)
        if r["params"].get(SEED) in seeds.setdefault(config, []):
            continue  # the same run listed twice (a baseline and its experiment)
        seeds[config].append(r["params"].get(SEED))
        groups.setdefault(config, []).append(float(value))
    band = [
        {
            "seeds": sorted(seeds[c], key=str),
            "n": len(v),
            "mean": pd.Series(v).mean(),
            "std": pd.Series(v).std(ddof=1),
            "min": min(v),
            "max": max(v),
        }
        for c, v in groups.items()
        if len(v) >= 2
    ]
    return pd.DataFrame(band, columns=["seeds", "n", "mean", "std", "min", "max"])


def loss_curve(repo: Path, rev: str) -> pd.DataFrame | None:
    """The step loss curve as committed in `rev` (the workspace for 'workspace')."""
    if rev == "workspace":
        path = repo / LOSS_TSV
        return pd.read_csv(path, sep="\t") if path.is_file() else None
    proc = subprocess.run(
        ["git", "show", f"{rev}:{LOSS_TSV}"], cwd=repo, capture_output=True, text=True
    )
    return pd.read_csv(io.StringIO(proc.stdout), sep="\t") if proc.returncode == 0 else None


def plot(repo: Path, rows: list[dict[str, Any]], param: str, metric: str, out: Path) -> None:
    frame = table(rows, [param], [metric]).dropna()
    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    ax_metric.scatter(frame[param], frame[metric])
    for _, r in frame.iterrows():
        ax_metric.annotate(r["experiment"], (r[param], r[metric]), fontsize=8)
    ax_metric.set_xlabel(param)
    ax_metric.set_ylabel(metric)
    for r in rows:
        curve = loss_curve(repo, r["rev"])
        if curve is not None:
            ax_loss.plot(
                curve["step"],
                curve["loss"],
                label=f"{r['name']} ({param}={r['params'].get(param)})",
            )
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("train loss")
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
