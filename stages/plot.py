"""plot: reports/train (DVCLive logs) → reports/figures/*.png."""

from pathlib import Path

from lorapipe import progress, stage
from lorapipe.plots import plot_training


def main(p):
    figures = plot_training(Path("reports/train/plots/metrics"), Path("reports/figures"))
    print(progress.summary("plot", ["reports/figures"], f"{len(figures)} figures"))


if __name__ == "__main__":
    stage.run(main)
