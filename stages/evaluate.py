"""evaluate: base + adapter on the eval split → reports/eval.json (base vs tuned), samples."""

from pathlib import Path

from lorapipe import stage
from lorapipe.evaluation import evaluate


def main(p):
    metrics = evaluate(
        p,
        Path("data/tokenized"),
        Path("models/adapter"),
        Path("reports/eval.json"),
        Path("reports/samples.json"),
    )
    print({k: metrics[k] for k in ("metric", metrics["metric"], "gain")})


if __name__ == "__main__":
    stage.run(main)
