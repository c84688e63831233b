"""merge: base + adapter → models/merged (standalone, with tokenizer), reports/merge.json."""

from pathlib import Path

from lorapipe import stage


def main(p):
    from lorapipe.merge import merge  # after params are valid: torch takes seconds

    result = merge(
        p,
        Path("data/tokenized"),
        Path("models/adapter"),
        Path("models/merged"),
        Path("reports/merge.json"),
        Path("reports/train/metrics.json"),
    )
    print(result)


if __name__ == "__main__":
    stage.run(main, tracked_outs=["reports/merge.json"])
