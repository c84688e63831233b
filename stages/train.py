"""train: data/tokenized → models/adapter (PEFT), models/checkpoint, reports/train (DVCLive)."""

from pathlib import Path

from lorapipe import stage


def main(p):
    # After params are valid: torch, transformers and peft take seconds to import.
    from lorapipe import runtime
    from lorapipe.launch import relaunch
    from lorapipe.modeling import preflight
    from lorapipe.training import train

    config = preflight(p)  # shape-only checks (target modules, bitsandbytes) before any weights
    # train.num_processes > 1 (or auto on several GPUs): this script runs again on every rank.
    if relaunch(p, __file__, runtime.world_size(p, runtime.device_count())):
        return
    summary = train(
        p,
        tokenized=Path("data/tokenized"),
        adapter_out=Path("models/adapter"),
        checkpoint_out=Path("models/checkpoint"),
        report_dir=Path("reports/train"),
        work_root=Path("models/.work"),
        rt=runtime.resolve(p, config),
    )
    print(summary)


if __name__ == "__main__":
    stage.run(
        main,
        tracked_outs=["reports/train"],
        interrupted="the newest complete checkpoint in models/.work/ is kept; "
        f"{stage.RESUME} from it",
    )
