"""evaluate: base + adapter on the eval split → reports/eval.json (base vs tuned), samples."""

from pathlib import Path

from lorapipe import stage


def main(p):
    from lorapipe.evaluation import evaluate  # after params are valid: torch takes seconds

    metrics = evaluate(
        p,
        Path("data/tokenized"),
        Path("models/adapter"),
        Path("reports/eval.json"),
        Path("reports/samples.json"),
    )
    print({k: metrics[k] for k in ("metric", metrics["metric"], "gain")})


if __name__ == "__main__":
    stage.run(main, tracked_outs=["reports/eval.json"])
