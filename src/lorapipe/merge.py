"""The merge stage's library: W' = W + (alpha/r)·B·A folded into a standalone, verified model.

The merge happens in the base checkpoint's own dtype (a bf16 checkpoint is merged and saved in
bf16, never in 4/8-bit), on this GPU when the model fits in half of it, else on the CPU. The
saved folder is reloaded and checked against base + adapter on the same device in the same
dtype (lorapipe.merge_check): relative max logit difference within merge.tolerance, top-1
agreement at least merge.min_top1_agreement, and a gap that is a small share of the LoRA layers'
own effect. The reloaded folder is then scored on the eval split (what a user of models/merged
gets). A quantized run is also compared with the quantized base + adapter it was trained on
(reported, not enforced: that gap is the quantization's).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import datasets
import torch

from lorapipe import progress
from lorapipe.card import model_card
from lorapipe.config import MODEL_KEYS, QUANT_KEYS, Params, UserError
from lorapipe.io import atomic_dir, read_json, write_json
from lorapipe.merge_check import (
    compare_logits,
    effect_share,
    lora_layers_off,
    merged_metrics,
    thresholds,
    verdict,
)
from lorapipe.modeling import build_meta_model, load_config, load_tokenizer, load_with_adapter
from lorapipe.packing import model_inputs
from lorapipe.provenance import certify
from lorapipe.runtime import Runtime, merge_runtime, resolve
from lorapipe.tasks import IGNORE, get_task

MERGE_KEYS = [
    *MODEL_KEYS,
    *QUANT_KEYS,
    "evaluate.batch_size",  # the merged model is scored as evaluate scores the adapter
    "evaluate.perplexity",
    "evaluate.stride",
    "merge",
]


@torch.no_grad()
def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = model_inputs(batch, next(model.parameters()).device)  # packed: position_ids, no cache
    return model(**inputs).logits.float().cpu()


def _scored(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logit rows that are scored: one per example, or one per target token."""
    if logits.dim() == 2:
        return logits
    return logits[batch["labels"] != IGNORE]


def _side(model: str, rt: Runtime) -> dict[str, str]:
    return {"model": model, "device": rt.device, "dtype": str(rt.base_dtype).removeprefix("torch.")}


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC as Python raises it, or as safetensors' Rust writer words it."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return f"(os error {errno.ENOSPC})" in str(exc)


def _no_space(out: Path, need: int) -> UserError:
    free = shutil.disk_usage(out.parent).free
    return UserError(
        f"merge: no space left in {out.parent} for {out}: the merged weights alone need about "
        f"{need / 1e6:,.0f} MB, {free / 1e6:,.0f} MB are free there; nothing was written"
    )


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
    weight_bytes = sum(t.numel() for t in meta.parameters()) * dtype.itemsize
    out.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(out.parent).free < weight_bytes:  # before loading anything
        raise _no_space(out, weight_bytes)
    mrt = merge_runtime(rt, dtype, weight_bytes)
    probe_rows = datasets.load_from_disk(str(tokenized))["eval"]
    probe_rows = probe_rows.select(range(min(p.merge.probe_size, len(probe_rows))))
    probe = task.collator(tok, p)(list(probe_rows))  # model_inputs drops `length`
    phase = progress.Phases("merge", 4)
    phase("loading base + adapter (full precision)")
    peft_model = load_with_adapter(p, mrt, adapter, tok.pad_token_id, quantized=False)
    expected = _scored(_logits(peft_model, probe), probe)
    with lora_layers_off(peft_model):
        without = _scored(_logits(peft_model, probe), probe)
    phase("merging W + (alpha/r)·B·A")
    merged = peft_model.merge_and_unload()
    tolerance, min_top1, max_share = thresholds(p.merge, mrt.base_dtype)
    dtype_name = str(mrt.base_dtype).removeprefix("torch.")
    result: dict[str, Any] = {
        "tolerance": tolerance,
        "min_top1_agreement": min_top1,
        "max_effect_share": max_share,
        "probe_rows": len(probe_rows),
        "expected": _side("base + adapter, unmerged", mrt),
        "merged": _side("the saved merged folder, reloaded", mrt),
    }
    usage = (
        f"from transformers import {task.auto_model.__name__}\n"
        f"model = {task.auto_model.__name__}.from_pretrained('{out}')"
    )
    try:
        with atomic_dir(out) as tmp:
            phase("saving")
            merged.save_pretrained(tmp)  # the checkpoint's dtype: W + scaling·B·A rounded once
            tok.save_pretrained(tmp)
            del merged, peft_model
            phase("verifying the saved model")
            # Verify the artifact a user will load, not the object in memory.
            reloaded = task.auto_model.from_pretrained(
                tmp, dtype=mrt.base_dtype, device_map=mrt.device_map
            )
            got = _scored(_logits(reloaded, probe), probe)
            result |= compare_logits(expected, got) | effect_share(without, expected, got)
            result["passed"], result["verdict"] = verdict(result, dtype_name)
            if not result["passed"]:
                raise UserError(f"merge: {result['verdict']}; nothing was written")
            # What models/merged scores, in its own dtype (eval.json: the k-bit base + adapter).
            batch = mrt.eval_batch_size
            result["merged"] |= merged_metrics(p, tokenized, tok, task, reloaded, batch)
            del reloaded
            if p.quant.bits != "none":
                quantized = load_with_adapter(p, rt, adapter, tok.pad_token_id, quantized=True)
                got = _scored(_logits(quantized, probe), probe)
                result["max_abs_logit_diff_vs_quantized"] = (got - expected).abs().max().item()
                result["quantized"] = _side("k-bit base + adapter (as trained)", rt)
            metrics = {"train": read_json(train_metrics), "merge": result}
            trained_with = read_json(adapter / "lorapipe_params.json")
            card = model_card("Merged LoRA model", trained_with, metrics, usage)
            (tmp / "README.md").write_text(card, encoding="utf-8")
            certify(tmp, out, mrt, result)
    except Exception as exc:  # the temporary folder is gone: atomic_dir removed it
        if not _disk_full(exc):
            raise
        raise _no_space(out, weight_bytes) from None
    write_json(report, result)
    phase.close()
    return result
