"""PNG curves from DVCLive's step logs (reports/train/plots/metrics/**/*.tsv)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: a stage never opens a window
import matplotlib.pyplot as plt
import pandas as pd

from lorapipe.io import atomic_dir


def read_curves(metrics_dir: Path) -> dict[str, pd.DataFrame]:
    """{'loss': frame(step, value), 'eval/loss': ...} for every DVCLive tsv under metrics_dir."""
    curves = {}
    for tsv in sorted(metrics_dir.rglob("*.tsv")):
        name = tsv.relative_to(metrics_dir).with_suffix("").as_posix()
        frame = pd.read_csv(tsv, sep="\t")
        curves[name] = frame.rename(columns={frame.columns[-1]: "value"})[["step", "value"]]
    return curves


def _epoch_of(curves: dict[str, pd.DataFrame], steps: pd.Series) -> pd.Series:
    """Map optimizer steps to epochs through the logged `epoch` curve (the step itself where no
    epoch was logged)."""
    if "epoch" not in curves:
        return steps
    epochs = curves["epoch"].drop_duplicates("step").set_index("step")["value"]
    return steps.map(epochs)


def _plot_loss_lr(curves: dict[str, pd.DataFrame], path: Path) -> None:
    panels = [name for name in ("loss", "learning_rate") if name in curves]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3 * len(panels)), sharex=True)
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, name in zip(axes, panels, strict=True):
        if name == "loss":
            ax.plot(curves["loss"].step, curves["loss"].value, "o-", label="train loss")
            if "eval/loss" in curves:
                ax.plot(
                    curves["eval/loss"].step, curves["eval/loss"].value, "o-", label="eval loss"
                )
            ax.set_ylabel("loss")
            ax.legend()
        else:
            ax.plot(curves[name].step, curves[name].value, "o-", color="tab:green")
            ax.set_ylabel("learning rate")
    axes[-1].set_xlabel("optimizer step")
    titles = {"loss": "training loss", "learning_rate": "learning rate"}
    fig.suptitle(" and ".join(titles[name] for name in panels).capitalize() + " per step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training(metrics_dir: Path, out_dir: Path) -> list[str]:
    """The figures of whatever curves were logged: loss and learning rate per step, each eval
    metric per epoch. A run with none of them gets an empty folder."""
    curves = read_curves(metrics_dir)
    with atomic_dir(out_dir) as tmp:
        if "loss" in curves or "learning_rate" in curves:
            _plot_loss_lr(curves, tmp / "loss_lr.png")
        evals = [
            name
            for name in curves
            if name.startswith("eval/") and not name.endswith(("epoch", "runtime", "per_second"))
        ]
        if evals:
            fig, axes = plt.subplots(1, len(evals), figsize=(4 * len(evals), 3.5), squeeze=False)
            for ax, name in zip(axes[0], evals, strict=True):
                frame = curves[name]
                ax.plot(_epoch_of(curves, frame.step), frame.value, "o-")
                ax.set_title(name)
                ax.set_xlabel("epoch" if "epoch" in curves else "optimizer step")
            fig.tight_layout()
            fig.savefig(tmp / "eval_per_epoch.png", dpi=100)
            plt.close(fig)
    return sorted(p.name for p in out_dir.glob("*.png"))
