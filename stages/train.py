"""train: data/tokenized → models/adapter (PEFT), models/checkpoint, reports/train (DVCLive)."""

from pathlib import Path

from lorapipe import progress, stage


def main(p):
    # After params are valid: torch, transformers and peft take seconds to import.
    from lorapipe import runtime, slots
    from lorapipe.io import read_json
    from lorapipe.launch import launched, relaunch
    from lorapipe.modeling import preflight
    from lorapipe.training import train

    config = preflight(p)  # shape-only checks (target modules, bitsandbytes) before any weights
    if launched():  # a rank, or the one process of a slot: the launching stage holds the slot
        return fit(p, runtime.resolve(p, config), train)
    visible = slots.visible_devices(runtime.device_count())
    with slots.held(visible, p.train.num_processes) as slot:
        # Several processes, or one GPU of several: this script runs again in children.
        if not relaunch(p, __file__, slot, visible):
            fit(p, runtime.resolve(p, config), train)
    m = read_json("reports/train/metrics.json")
    loss = f"loss {m['loss']:.4f}" if "loss" in m else "no loss logged"
    headline = f"{loss} at step {m['global_steps']} (effective batch {m['effective_batch_size']})"
    wrote = ["models/adapter", "models/checkpoint", "reports/train"]
    print(progress.summary("train", wrote, headline))


def fit(p, rt, train):
    train(
        p,
        tokenized=Path("data/tokenized"),
        adapter_out=Path("models/adapter"),
        checkpoint_out=Path("models/checkpoint"),
        report_dir=Path("reports/train"),
        work_root=Path("models/.work"),
        rt=rt,
    )


if __name__ == "__main__":
    stage.run(
        main,
        tracked_outs=["reports/train"],
        interrupted="the newest complete checkpoint in models/.work/ is kept; "
        f"{stage.RESUME} from it",
    )
