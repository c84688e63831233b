"""The merge stage's verification: is the saved folder base + adapter, and how good is it?

Three logit sets on the probe: base + adapter unmerged (expected), the same with every LoRA layer
switched off (W alone; a trained head and biases kept: what the merge must add is (alpha/r)·B·A
and nothing else), and the saved merged folder (got). The tolerance and top-1 checks compare got
with expected; the effect share compares their gap with the LoRA layers' own effect, so a merge
that skipped the delta (share 1) or scaled it wrongly (c·alpha/r: share |c - 1|) fails even
where the LoRA's effect is small enough to fit inside the tolerance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import torch
from peft.tuners.lora import LoraLayer
from transformers import DataCollatorForSeq2Seq

from lorapipe.config import Params
from lorapipe.evaluation import evaluate_model, sliding_windows
from lorapipe.sections_run import MergeParams
from lorapipe.tasks import IGNORE

# `auto` thresholds per dtype: (relative max logit difference, top-1 agreement) that rounding
# alone stays within. Measured: fp32 merges 3e-7 (MiniLM) and 2e-6 (SmolLM2-135M), agreement 1;
# a bf16 SmolLM2-135M merge 3.6e-2 and 0.966 (W' is rounded to 8 mantissa bits once, which
# flips near-tied tokens). fp16 has 3 more mantissa bits than bf16; not measured here.
AUTO = {
    torch.float32: (1e-4, 0.99),
    torch.bfloat16: (1e-1, 0.9),
    torch.float16: (5e-2, 0.95),
}
# The largest RMS(merged - unmerged) / RMS(unmerged - LoRA layers off) accepted. To first order
# a merge at c·(alpha/r) scores |c - 1| (no delta: 1, half or double: 0.5 and 1; alpha/sqrt(r)
# for alpha/r at r = 8: 1.8), and rounding W' once adds noise over the effect. Measured on a
# tiny BERT, correct merges: bf16 0.011 / 0.10 / 0.27 for LoRA effects of 50 / 5 / 0.5 % of the
# largest logit (fp16 0.001..0.01); fp32 2e-7..1e-5. 16-bit: 0.25 refuses any scale off by a
# quarter and leaves bf16 rounding room; fp32: 1e-2 still refuses a 1 % scaling error.
MAX_EFFECT_SHARE = {torch.float32: 1e-2, torch.bfloat16: 0.25, torch.float16: 0.25}


def thresholds(m: MergeParams, dtype: torch.dtype) -> tuple[float, float, float]:
    """(tolerance, min top-1 agreement, max effect share) for a merge in `dtype`."""
    auto_tolerance, auto_top1 = AUTO[dtype]
    tolerance = auto_tolerance if m.tolerance == "auto" else m.tolerance
    min_top1 = auto_top1 if m.min_top1_agreement == "auto" else m.min_top1_agreement
    return tolerance, min_top1, MAX_EFFECT_SHARE[dtype]


@contextmanager
def lora_layers_off(model: torch.nn.Module) -> Iterator[None]:
    """Every LoRA layer computes W·x alone; modules_to_save (a trained head) stay trained."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def compare_logits(expected: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Max |Δ|, max |Δ| relative to the largest expected logit, and top-1 agreement."""
    diff = (got - expected).abs().max().item()
    return {
        "max_abs_logit_diff": diff,
        "max_rel_logit_diff": diff / max(expected.abs().max().item(), 1e-12),
        "top1_agreement": (got.argmax(-1) == expected.argmax(-1)).float().mean().item(),
    }


def _rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def effect_share(without: torch.Tensor, expected: torch.Tensor, got: torch.Tensor) -> dict:
    """The LoRA layers' effect on the probe logits and the merge's error as a share of it."""
    effect, error = _rms(expected - without), _rms(got - expected)
    return {
        "lora_effect_rms": effect,
        "max_abs_lora_effect": (expected - without).abs().max().item(),
        "merge_error_rms": error,
        # None: the LoRA layers change no probe logit (B = 0, untrained): nothing to merge.
        "effect_share": error / effect if effect > 0 else None,
    }


def verdict(r: dict[str, Any], dtype: str) -> tuple[bool, str]:
    """(passed, one line saying why) from a result holding the figures and thresholds."""
    problems = []
    tol, top1 = r["tolerance"], r["min_top1_agreement"]
    if r["max_rel_logit_diff"] > tol or r["top1_agreement"] < top1:
        problems.append(
            f"the merged model differs from base + adapter: relative max logit difference "
            f"{r['max_rel_logit_diff']:.3g} (merge.tolerance {tol:g}), top-1 agreement "
            f"{r['top1_agreement']:.3f} (merge.min_top1_agreement {top1:g})"
        )
    share, most = r["effect_share"], r["max_effect_share"]
    if share is not None and share > most:
        problems.append(
            f"merged vs base + adapter differ by {share:.3g} of the LoRA layers' own effect "
            f"(RMS Δlogit {r['merge_error_rms']:.3g} vs {r['lora_effect_rms']:.3g}; at most "
            f"{most:g} in {dtype}): (alpha/r)·B·A was not added, or added at the wrong scale, "
            f"or the effect is below {dtype} rounding of the merged weights"
        )
    if problems:
        return False, "; ".join(problems)
    if share is None:
        return True, "the adapter has no effect on the probe (B = 0?): it merges trivially"
    return True, f"merged == base + adapter within {dtype} rounding ({share:.2g} of the effect)"


def merged_metrics(
    p: Params, tokenized: Path, tok: Any, task: Any, model: Any, batch_size: int
) -> dict[str, Any]:
    """The task metric of `model` on what evaluate scores: the eval split, or its stream."""
    scored, collator = datasets.load_from_disk(str(tokenized))["eval"], task.collator(tok, p)
    if p.evaluate.perplexity == "sliding_window":
        stream = datasets.load_from_disk(str(tokenized))["eval_stream"]["input_ids"][:]
        stride = p.evaluate.stride or max(1, p.tokenize.max_length // 2)
        scored = sliding_windows(list(chain(*stream)), p.tokenize.max_length, stride)
        collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE)
    summary = evaluate_model(model, scored, collator, task, batch_size)
    return {"metric": task.metric, **summary}
