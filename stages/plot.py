"""plot: reports/train (DVCLive logs) → reports/figures/*.png."""

from pathlib import Path

from lorapipe import progress, stage


def main(p):
    from lorapipe.plots import plot_training  # after params are valid

    figures = plot_training(Path("reports/train/plots/metrics"), Path("reports/figures"))
    print(progress.summary("plot", ["reports/figures"], f"{len(figures)} figures"))


if __name__ == "__main__":
    stage.run(main, tracked_outs=["reports/figures"])
