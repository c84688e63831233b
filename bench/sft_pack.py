"""Benchmark: SFT on a real prompt/response set, per-row padding vs packing, at the same steps.

    python bench/sft_pack.py             # SmolLM2-135M (fp32) + LoRA on pydoc:qa, ~5 min on 2 cores
    python bench/sft_pack.py --steps 4   # a smoke run; its numbers mean little

Both sides are the pipeline's own tokenize and train stages (lorapipe.data.tokenize,
lorapipe.training.train) on the same rows, model, seed and batch size; they differ only in
`tokenize.layout`: `pad` (a row per pair, batches of similar lengths, padded per batch) or
`pack` (whole pairs best-fit into blocks, no padding inside a block, no cross-talk). Measured:
real tokens/s (padding excluded) from the end of step 1 to the end of the last step, the train
loss per step, and the held-out loss after training (the evaluate stage, same eval rows).

Writes reports/bench_sft.json and reports/bench_sft.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any
from unittest import mock

import datasets
import torch
from transformers import TrainerCallback

from lorapipe.config import Params, parse_params
from lorapipe.data import tokenize
from lorapipe.evaluation import evaluate
from lorapipe.recipes import recipe_params
from lorapipe.tasks import SFT
from lorapipe.training import train

ROOT = Path(__file__).resolve().parents[1]


class Meter(TrainerCallback):
    """Real and computed tokens of each training batch, step end times, the logged losses.

    The real count comes from the collator (the rows it was given), the computed one from the
    model's forward (batch x width): packed blocks carry no attention mask to count from.
    """

    def __init__(self) -> None:
        self.pending: deque[int] = deque()  # real tokens of collated, not yet computed batches
        self.real: list[int] = []
        self.computed: list[int] = []
        self.step_ends: list[float] = []
        self.losses: list[tuple[int, float]] = []

    def wrap(self, collator: Any) -> Any:
        def collate(rows: list[dict[str, Any]]) -> Any:
            self.pending.append(sum(len(r["input_ids"]) for r in rows))
            return collator(rows)

        return collate

    def count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if module.training:
            self.real.append(self.pending.popleft())
            self.computed.append(int(kwargs["input_ids"].numel()))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.hook = kwargs["model"].register_forward_pre_hook(self.count, with_kwargs=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_ends.append(time.perf_counter())

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.hook.remove()


def side_params(layout: str, args: argparse.Namespace) -> Params:
    raw = recipe_params("sft-prompt-response").model_dump()
    raw["data"].update(train="pydoc:qa", eval=None, eval_fraction=0.15)
    raw["tokenize"].update(max_length=args.max_length, layout=layout)
    raw["train"].update(
        max_steps=args.steps,
        batch_size=args.batch,
        logging_steps=1,
        eval_strategy="no",
        save_steps=args.steps,
        sampling="group_by_length",
        mixed_precision="no",
    )
    raw["evaluate"].update(num_samples=0)  # held-out loss only, no generation
    return parse_params(raw, f"bench sft {layout}")


def run_side(layout: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    p = side_params(layout, args)
    tokenized = root / layout / "tokenized"
    meta = tokenize(p, tokenized)
    meter = Meter()
    real_collator = SFT.collator

    def collator(task: Any, tok: Any, p: Params) -> Any:
        return meter.wrap(real_collator(task, tok, p))

    side = root / layout
    with mock.patch.object(SFT, "collator", collator):
        train(
            p, tokenized, side / "adapter", side / "ckpt", side / "train", side / ".work", [meter]
        )
    seconds = meter.step_ends[-1] - meter.step_ends[0]  # one-time costs of step 1 left out
    real, computed = sum(meter.real[1:]), sum(meter.computed[1:])
    # The evaluate stage on this side's eval split: the same rows on both sides, packed or
    # not (a packed eval set scores as its rows alone, tests/test_packing.py).
    held_out = evaluate(p, tokenized, side / "adapter", side / "eval.json", side / "samples.json")
    train_rows = datasets.load_from_disk(str(tokenized))["train"]
    return {
        "train_rows": len(train_rows),
        "train_tokens": meta["tokens"]["train"],
        "steps": len(meter.step_ends),
        "timed_seconds": round(seconds, 2),
        "real_tokens_per_s": round(real / seconds, 1),
        "computed_tokens_per_s": round(computed / seconds, 1),
        "real_token_fraction": round(real / computed, 4),
        "real_tokens_per_step": round(sum(meter.real) / len(meter.real), 1),
        "epochs_seen": round(sum(meter.real) / meta["tokens"]["train"], 2),
        "loss_per_step": meter.losses,
        "held_out_loss": round(held_out["tuned"]["loss"], 4),
        "held_out_perplexity": round(held_out["tuned"]["perplexity"], 3),
        "held_out_tokens": held_out["tuned"]["tokens"],
        "held_out_loss_base": round(held_out["base"]["loss"], 4),
    }


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for layout, side in result["sides"].items():
        steps, losses = zip(*side["loss_per_step"], strict=True)
        label = f"{layout} ({side['real_tokens_per_s']:.0f} real tok/s)"
        axes[0].plot(steps, losses, marker=".", label=label)
        tokens = [s * side["real_tokens_per_step"] for s in steps]
        axes[1].plot(tokens, losses, marker=".", label=layout)
    axes[0].set(xlabel="optimizer step", ylabel="train loss (response tokens)", title="same steps")
    axes[1].set(xlabel="real tokens seen (approx.)", title="same tokens")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"SFT on pydoc:qa, SmolLM2-135M + LoRA, max_length {result['max_length']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench_sft.json"))
    ap.add_argument("--png", default=str(ROOT / "reports" / "bench_sft.png"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sides = {layout: run_side(layout, args, root) for layout in ("pad", "pack")}
    pad, pack = sides["pad"], sides["pack"]
    result = {
        "model": side_params("pad", args).model.name,
        "data": "pydoc:qa",
        "max_length": args.max_length,
        "batch_size": args.batch,
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "sides": sides,
        "speedup_real_tokens_per_s": round(pack["real_tokens_per_s"] / pad["real_tokens_per_s"], 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    chart(result, Path(args.png))
    for layout, side in sides.items():
        print(
            f"{layout:4s} real tok/s {side['real_tokens_per_s']:8.1f}  real share "
            f"{side['real_token_fraction']:.3f}  tok/step {side['real_tokens_per_step']:7.1f}  "
            f"held-out loss {side['held_out_loss']:.4f}"
        )
    print(f"pack / pad real tokens/s: {result['speedup_real_tokens_per_s']}x; wrote {args.out}")


if __name__ == "__main__":
    main()
