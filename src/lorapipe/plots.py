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
    """Map optimizer steps to epochs through the logged `epoch` curve."""
    epochs = curves["epoch"].drop_duplicates("step").set_index("step")["value"]
    return steps.map(epochs)


def plot_training(metrics_dir: Path, out_dir: Path) -> list[str]:
    curves = read_curves(metrics_dir)
    if "loss" not in curves:
        raise FileNotFoundError(f"{metrics_dir}: no training loss logged")
    with atomic_dir(out_dir) as tmp:
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        ax_loss.plot(curves["loss"].step, curves["loss"].value, label="train loss")
        if "eval/loss" in curves:
            ax_loss.plot(
                curves["eval/loss"].step, curves["eval/loss"].value, "o-", label="eval loss"
            )
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        ax_lr.plot(curves["learning_rate"].step, curves["learning_rate"].value, color="tab:green")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_xlabel("optimizer step")
        fig.suptitle("Training loss and learning rate per step")
        fig.tight_layout()
        fig.savefig(tmp / "loss_lr.png", dpi=100)
        plt.close(fig)

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
                ax.set_xlabel("epoch")
            fig.tight_layout()
            fig.savefig(tmp / "eval_per_epoch.png", dpi=100)
            plt.close(fig)
    return sorted(p.name for p in out_dir.glob("*.png"))
