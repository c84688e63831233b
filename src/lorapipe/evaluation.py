"""The evaluate stage's library: base vs tuned metrics on the eval split, and a few samples."""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import DataCollatorForSeq2Seq, set_seed

from lorapipe.config import MODEL_KEYS, QUANT_KEYS, Params
from lorapipe.io import write_json
from lorapipe.metrics import evaluate_model
from lorapipe.modeling import load_config, load_tokenizer, load_with_adapter
from lorapipe.packing import first_document
from lorapipe.runtime import Runtime, autocast, resolve
from lorapipe.tasks import IGNORE, get_task

EVAL_KEYS = [
    *MODEL_KEYS,
    *QUANT_KEYS,
    "evaluate.batch_size",
    "evaluate.num_samples",
    "evaluate.max_new_tokens",
    "evaluate.perplexity",
    "evaluate.stride",
    "train.seed",
    "train.mixed_precision",  # evaluation runs under training's autocast
]


def sliding_windows(stream: list[int], window: int, stride: int) -> datasets.Dataset:
    """The stream cut into windows that overlap by window - stride tokens, as in transformers'
    perplexity guide: each window scores only the tokens no earlier window scored, so (with
    stride < window) every token but the first is scored once, with up to window - 1 tokens of
    context."""
    ids, labels, scored_to = [], [], 0
    for begin in range(0, len(stream), stride):
        end = min(begin + window, len(stream))
        chunk = stream[begin:end]
        ids.append(chunk)
        labels.append([IGNORE] * (scored_to - begin) + chunk[scored_to - begin :])
        scored_to = end
        if end == len(stream):
            break
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


@torch.no_grad()
def samples(p: Params, model: Any, tok: Any, data: datasets.Dataset) -> list[dict[str, Any]]:
    """A few eval rows run through the tuned model: label + probability, or a greedy completion."""
    rows = data.select(range(min(p.evaluate.num_samples, len(data))))
    device = next(model.parameters()).device
    out = []
    for row in rows:
        row = first_document(row)  # a packed block's first document, its positions from 0
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
        # The prompt: an sft row's unlabelled prefix, or the first quarter of a text.
        if p.task == "sft":
            cut = next(i for i, lab in enumerate(row["labels"]) if lab != IGNORE)
        else:
            cut = max(1, len(row["input_ids"]) // 4)
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
    scored = data
    if p.evaluate.perplexity == "sliding_window":
        stream = datasets.load_from_disk(str(tokenized))["eval_stream"]["input_ids"][:]
        stride = p.evaluate.stride or max(1, p.tokenize.max_length // 2)
        scored = sliding_windows(list(chain(*stream)), p.tokenize.max_length, stride)
        collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE)
    # rt.eval_batch_size: evaluate.batch_size, bounded so one batch's logits fit the device.
    with autocast(rt):
        tuned = evaluate_model(model, scored, collator, task, rt.eval_batch_size)
        with model.disable_adapter():
            base = evaluate_model(model, scored, collator, task, rt.eval_batch_size)
    key = task.metric
    metrics = {
        **({"perplexity_method": p.evaluate.perplexity} if task.metric == "perplexity" else {}),
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
