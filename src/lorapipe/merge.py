"""The merge stage's library: W' = W + (alpha/r)·B·A folded into a standalone, verified model.

The merge happens in the base checkpoint's own dtype (a bf16 checkpoint is merged and saved in
bf16, never in 4/8-bit), on this GPU when the model fits in half of it, else on the CPU. The
saved folder is reloaded and checked against base + adapter on the same device in the same
dtype: relative max logit difference within merge.tolerance and top-1 agreement at least
merge.min_top1_agreement. A quantized run is also compared with the quantized base + adapter it
was trained on (reported, not enforced: that gap is the quantization's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import torch

from lorapipe import progress
from lorapipe.card import model_card
from lorapipe.config import MODEL_KEYS, QUANT_KEYS, Params, UserError
from lorapipe.io import atomic_dir, read_json, write_json
from lorapipe.lora import ADAPTER_KEYS
from lorapipe.modeling import load_config, load_tokenizer, load_with_adapter
from lorapipe.packing import model_inputs
from lorapipe.plan import build_meta_model
from lorapipe.provenance import certify
from lorapipe.runtime import Runtime, merge_runtime, resolve
from lorapipe.tasks import IGNORE, get_task

MERGE_KEYS = [
    *MODEL_KEYS,
    *ADAPTER_KEYS,
    *QUANT_KEYS,
    "merge.tolerance",
    "merge.min_top1_agreement",
    "merge.probe_size",
]
# `auto` thresholds per dtype: (relative max logit difference, top-1 agreement) that rounding
# alone stays within. Measured: fp32 merges 3e-7 (MiniLM) and 2e-6 (SmolLM2-135M), agreement 1;
# a bf16 SmolLM2-135M merge 3.6e-2 and 0.966 (W' is rounded to 8 mantissa bits once, which
# flips near-tied tokens). fp16 has 3 more mantissa bits than bf16; not measured here.
AUTO = {
    torch.float32: (1e-4, 0.99),
    torch.bfloat16: (1e-1, 0.9),
    torch.float16: (5e-2, 0.95),
}


@torch.no_grad()
def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = model_inputs(batch, next(model.parameters()).device)  # packed: position_ids, no cache
    return model(**inputs).logits.float().cpu()


def _scored(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logit rows that are scored: one per example, or one per target token."""
    if logits.dim() == 2:
        return logits
    return logits[batch["labels"] != IGNORE]


def compare_logits(expected: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Max |Δ|, max |Δ| relative to the largest expected logit, and top-1 agreement."""
    diff = (got - expected).abs().max().item()
    return {
        "max_abs_logit_diff": diff,
        "max_rel_logit_diff": diff / max(expected.abs().max().item(), 1e-12),
        "top1_agreement": (got.argmax(-1) == expected.argmax(-1)).float().mean().item(),
    }


def _side(model: str, rt: Runtime) -> dict[str, str]:
    return {"model": model, "device": rt.device, "dtype": str(rt.base_dtype).removeprefix("torch.")}


def merge(
    p: Params,
    tokenized: Path,
    adapter: Path,
    out: Path,
    report: Path,
    train_metrics: Path,
    rt: Runtime | None = None,
) -> dict[str, Any]:
    """`rt`: the stage's resolved runtime (resolved for this machine when not given)."""
    task, tok, config = get_task(p.task), load_tokenizer(p), load_config(p)
    rt = rt or resolve(p, config)
    # The checkpoint's dtype (transformers reads it into a torch.dtype; None: saved without).
    dtype = config.dtype or torch.float32
    # Its bytes from the config's shapes: a hub id has no local files to measure.
    meta = build_meta_model(config, p.task, p.data.num_labels)
    mrt = merge_runtime(rt, dtype, sum(t.numel() for t in meta.parameters()) * dtype.itemsize)
    probe_rows = datasets.load_from_disk(str(tokenized))["eval"]
    probe_rows = probe_rows.select(range(min(p.merge.probe_size, len(probe_rows))))
    probe = task.collator(tok, p)(list(probe_rows))  # model_inputs drops `length`
    phase = progress.Phases("merge", 4)
    phase("loading base + adapter (full precision)")
    peft_model = load_with_adapter(p, mrt, adapter, tok.pad_token_id, quantized=False)
    expected = _scored(_logits(peft_model, probe), probe)
    phase("merging W + (alpha/r)·B·A")
    merged = peft_model.merge_and_unload()
    auto_tolerance, auto_top1 = AUTO[mrt.base_dtype]
    m = p.merge
    tolerance = auto_tolerance if m.tolerance == "auto" else m.tolerance
    min_top1 = auto_top1 if m.min_top1_agreement == "auto" else m.min_top1_agreement
    result: dict[str, Any] = {
        "tolerance": tolerance,
        "min_top1_agreement": min_top1,
        "probe_rows": len(probe_rows),
        "expected": _side("base + adapter, unmerged", mrt),
        "merged": _side("the saved merged folder, reloaded", mrt),
    }
    usage = (
        f"from transformers import {task.auto_model.__name__}\n"
        f"model = {task.auto_model.__name__}.from_pretrained('{out}')"
    )
    with atomic_dir(out) as tmp:
        phase("saving")
        merged.save_pretrained(tmp)  # in the checkpoint's dtype: W' = W + scaling·B·A rounded once
        tok.save_pretrained(tmp)
        del merged, peft_model
        phase("verifying the saved model")
        # Verify the artifact a user will load, not the object in memory.
        reloaded = task.auto_model.from_pretrained(
            tmp, dtype=mrt.base_dtype, device_map=mrt.device_map
        )
        result |= compare_logits(expected, _scored(_logits(reloaded, probe), probe))
        del reloaded
        if p.quant.bits != "none":
            quantized = load_with_adapter(p, rt, adapter, tok.pad_token_id, quantized=True)
            got = _scored(_logits(quantized, probe), probe)
            result["max_abs_logit_diff_vs_quantized"] = (got - expected).abs().max().item()
            result["quantized"] = _side("k-bit base + adapter (as trained)", rt)
        result["passed"] = (
            result["max_rel_logit_diff"] <= tolerance and result["top1_agreement"] >= min_top1
        )
        if not result["passed"]:
            raise UserError(
                f"merge: the merged model differs from base + adapter: relative max logit "
                f"difference {result['max_rel_logit_diff']:.3g} (merge.tolerance {tolerance:g}), "
                f"top-1 agreement {result['top1_agreement']:.3f} (merge.min_top1_agreement "
                f"{min_top1:g}); nothing was written"
            )
        metrics = {"train": read_json(train_metrics), "merge": result}
        trained_with = read_json(adapter / "lorapipe_params.json")
        card = model_card("Merged LoRA model", trained_with, metrics, usage)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        certify(tmp, out, mrt, result)
    write_json(report, result)
    phase.close()
    return result
