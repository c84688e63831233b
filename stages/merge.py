"""merge: base + adapter → models/merged (standalone, with tokenizer), reports/merge.json."""

from pathlib import Path

from lorapipe import progress, stage


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
    share, merged = result["effect_share"], result["merged"]
    headline = (  # a failed check raised before anything was written
        f"relative max |Δlogit| {result['max_rel_logit_diff']:.2g} <= {result['tolerance']:g}, "
        f"top-1 agreement {result['top1_agreement']:.3f}, "
        + (f"{share:.2g} of the LoRA's effect" if share is not None else "no LoRA effect")
        + f": passed; merged {merged['metric']} {merged[merged['metric']]:.4g}"
    )
    print(progress.summary("merge", ["models/merged", "reports/merge.json"], headline))


if __name__ == "__main__":
    stage.run(main, tracked_outs=["reports/merge.json"])
