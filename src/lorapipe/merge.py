"""The merge stage's library: W' = W + (alpha/r)·B·A folded into a standalone, verified model.

The merge always happens in full precision, never into 4- or 8-bit weights: the merged model is
compared with the full-precision base + adapter (must agree within merge.tolerance), and, for a
quantized run, also with the quantized base + adapter it was trained on (reported, not enforced).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import torch

from lorapipe.card import model_card
from lorapipe.config import MODEL_KEYS, QUANT_KEYS, Params, UserError
from lorapipe.io import atomic_dir, read_json, write_json
from lorapipe.modeling import load_tokenizer, load_with_adapter
from lorapipe.packing import model_inputs
from lorapipe.tasks import get_task

MERGE_KEYS = [
    *MODEL_KEYS,
    "lora.r",
    "lora.alpha",
    "lora.target_modules",
    *QUANT_KEYS,
    "merge.tolerance",
    "merge.probe_size",
]


@torch.no_grad()
def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = model_inputs(batch, next(model.parameters()).device)  # packed: position_ids, no cache
    return model(**inputs).logits.float().cpu()


def merge(
    p: Params, tokenized: Path, adapter: Path, out: Path, report: Path, train_metrics: Path
) -> dict[str, Any]:
    task, tok = get_task(p.task), load_tokenizer(p)
    probe_rows = datasets.load_from_disk(str(tokenized))["eval"]
    probe_rows = probe_rows.select(range(min(p.merge.probe_size, len(probe_rows))))
    probe = task.collator(tok, p)(
        [{k: v for k, v in r.items() if k != "length"} for r in probe_rows]
    )
    peft_model = load_with_adapter(p, adapter, quantized=False)
    expected = _logits(peft_model, probe)
    merged = peft_model.merge_and_unload()
    result: dict[str, Any] = {"tolerance": p.merge.tolerance, "probe_rows": len(probe_rows)}
    usage = (
        f"from transformers import {task.auto_model.__name__}\n"
        f"model = {task.auto_model.__name__}.from_pretrained('{out}')"
    )
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # Verify the artifact a user will load, not the object in memory.
        reloaded = task.auto_model.from_pretrained(tmp, dtype=torch.float32)
        result["max_abs_logit_diff"] = (_logits(reloaded, probe) - expected).abs().max().item()
        if p.quant.bits != "none":
            quantized = load_with_adapter(p, adapter, quantized=True)
            diff = (_logits(quantized, probe) - expected).abs().max().item()
            result["max_abs_logit_diff_vs_quantized"] = diff
        result["passed"] = result["max_abs_logit_diff"] <= p.merge.tolerance
        if not result["passed"]:
            raise UserError(
                f"merge: merged logits differ from base+adapter by "
                f"{result['max_abs_logit_diff']:.3g} > merge.tolerance {p.merge.tolerance:g}; "
                "nothing was written"
            )
        metrics = {"train": read_json(train_metrics), "merge": result}
        trained_with = read_json(adapter / "lorapipe_params.json")
        card = model_card("Merged LoRA model", trained_with, metrics, usage)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    write_json(report, result)
    return result
