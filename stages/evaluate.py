"""evaluate: base + adapter on the eval split → reports/eval.json (base vs tuned), samples."""

from pathlib import Path

from lorapipe import progress, stage


def main(p):
    from lorapipe.evaluation import evaluate  # after params are valid: torch takes seconds

    metrics = evaluate(
        p,
        Path("data/tokenized"),
        Path("models/adapter"),
        Path("reports/eval.json"),
        Path("reports/samples.json"),
    )
    key = metrics["metric"]
    headline = f"{key} {metrics[key]:.4g} (base {metrics['base'][key]:.4g}, {metrics['gain']:+.4g})"
    print(progress.summary("evaluate", ["reports/eval.json", "reports/samples.json"], headline))


if __name__ == "__main__":
    stage.run(main, tracked_outs=["reports/eval.json"])
