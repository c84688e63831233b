"""The evaluate stage's library: base vs tuned metrics on the eval split, and a few samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import set_seed

from lorapipe.config import MODEL_KEYS, QUANT_KEYS, Params
from lorapipe.io import write_json
from lorapipe.metrics import evaluate_model
from lorapipe.modeling import load_config, load_tokenizer, load_with_adapter
from lorapipe.runtime import Runtime, autocast, resolve
from lorapipe.tasks import IGNORE, get_task

EVAL_KEYS = [
    *MODEL_KEYS,
    *QUANT_KEYS,
    "evaluate.batch_size",
    "evaluate.num_samples",
    "evaluate.max_new_tokens",
    "train.seed",
    "train.mixed_precision",  # evaluation runs under training's autocast
]


@torch.no_grad()
def samples(p: Params, model: Any, tok: Any, data: datasets.Dataset) -> list[dict[str, Any]]:
    """A few eval rows run through the tuned model: label + probability, or a greedy completion."""
    rows = data.select(range(min(p.evaluate.num_samples, len(data))))
    device = next(model.parameters()).device
    out = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]], device=device)
        if p.task == "seq_cls":
            probs = model(input_ids=ids).logits.softmax(-1)[0]
            out.append(
                {
                    "text": tok.decode(row["input_ids"], skip_special_tokens=True),
                    "label": row["labels"],
                    "predicted": int(probs.argmax()),
                    "probability": round(float(probs.max()), 4),
                }
            )
            continue
        # The prompt: an sft row's unlabelled prefix, or the first quarter of a text block.
        cut = next((i for i, lab in enumerate(row["labels"]) if lab != IGNORE), 0)
        cut = cut or max(1, len(row["input_ids"]) // 4)
        gen = model.generate(
            input_ids=ids[:, :cut],
            attention_mask=torch.ones_like(ids[:, :cut]),
            max_new_tokens=p.evaluate.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        out.append(
            {
                "prompt": tok.decode(ids[0, :cut]),
                "reference": tok.decode(ids[0, cut:], skip_special_tokens=True),
                "generated": tok.decode(gen[0, cut:], skip_special_tokens=True),
            }
        )
    return out


def evaluate(
    p: Params,
    tokenized: Path,
    adapter: Path,
    metrics_out: Path,
    samples_out: Path,
    rt: Runtime | None = None,
) -> dict[str, Any]:
    """`rt`: the stage's resolved runtime (resolved for this machine when not given)."""
    task, tok = get_task(p.task), load_tokenizer(p)
    rt = rt or resolve(p, load_config(p))
    data = datasets.load_from_disk(str(tokenized))["eval"]
    # Seeded as the train stage: a new head gets the same init, so "base" is the model at step 0.
    set_seed(p.train.seed)
    # The base as it was trained (quantized if it was), in training's dtype and autocast.
    model = load_with_adapter(p, rt, adapter, tok.pad_token_id)
    collator = task.collator(tok, p)
    # rt.eval_batch_size: evaluate.batch_size, bounded so one batch's logits fit the device.
    with autocast(rt):
        tuned = evaluate_model(model, data, collator, task, rt.eval_batch_size)
        with model.disable_adapter():
            base = evaluate_model(model, data, collator, task, rt.eval_batch_size)
    key = task.metric
    metrics = {
        "task": p.task,
        "metric": key,
        key: tuned[key],
        "base": base,
        "tuned": tuned,
        "gain": tuned[key] - base[key],
    }
    write_json(metrics_out, metrics)
    with autocast(rt):
        write_json(samples_out, samples(p, model, tok, data))
    return metrics
