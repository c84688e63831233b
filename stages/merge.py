"""merge: base + adapter → models/merged (standalone, with tokenizer), reports/merge.json."""

from pathlib import Path

from lorapipe import progress, stage
from lorapipe.merge import merge


def main(p):
    result = merge(
        p,
        Path("data/tokenized"),
        Path("models/adapter"),
        Path("models/merged"),
        Path("reports/merge.json"),
        Path("reports/train/metrics.json"),
    )
    headline = (
        f"max |Δlogit| {result['max_abs_logit_diff']:.2g} <= tolerance {result['tolerance']:g}: "
        "passed"  # a failed check raised before anything was written
    )
    print(progress.summary("merge", ["models/merged", "reports/merge.json"], headline))


if __name__ == "__main__":
    stage.run(main)
