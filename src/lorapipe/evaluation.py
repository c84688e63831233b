"""The evaluate stage's library: the evaluation loop (sums over the whole set, metrics once at
the end, by the task), base vs tuned on the eval split, generated answers, a few samples."""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq, set_seed

from lorapipe import answers, chat, progress
from lorapipe.config import MODEL_KEYS, QUANT_KEYS, Params, UserError
from lorapipe.generation import Example, examples, generate
from lorapipe.io import write_json, write_text_atomic
from lorapipe.modeling import load_config, load_tokenizer, load_with_adapter
from lorapipe.packing import first_document, model_inputs
from lorapipe.runtime import Runtime, autocast, resolve
from lorapipe.tasks import IGNORE, get_task

EVAL_KEYS = [
    *MODEL_KEYS,
    *QUANT_KEYS,
    "evaluate",
    "data.format",  # the end-of-turn token generation stops at
    "data.chat_template",
    "data.label_names",  # evaluate.labels: auto
    "train.seed",
    "train.mixed_precision",  # evaluation runs under training's autocast
]


def evaluate_model(
    model: torch.nn.Module, dataset: Any, collator: Any, task: Any, batch_size: int
) -> dict[str, Any]:
    """Run `model` over `dataset` in its stored order (sorted by length: little padding)."""
    # Hand-written rather than Trainer.evaluate: Trainer averages per-batch mean losses, which
    # weighs tokens unequally; perplexity needs the token-level sum.
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)
    sums: dict[str, Any] = {}
    # no_grad as a block, not a decorator: mutation testing (`make mutate`) skips decorated code.
    with torch.no_grad():
        for batch in progress.bar(loader, "evaluate", unit="batch"):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**model_inputs(batch, device)).logits
            for key, value in task.score_batch(logits, batch).items():
                sums[key] = sums[key] + value if key in sums else value
    return task.summarize(sums)


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
    task = get_task(p.task)
    # A packed block's first document, its positions from 0.
    return [task.sample(model, tok, first_document(row), p) for row in rows]


def answer_set(p: Params, tok: Any, data: datasets.Dataset) -> tuple[list[Example], list[str]]:
    """The eval split's examples and their references as text, checked against the label set
    before any model loads."""
    stops = chat.stop_ids(tok, p.data)
    exs = examples(data, stops)
    if not exs:
        raise UserError("evaluate.generate: the eval split has no example with an answer")
    refs = [tok.decode(x.reference, skip_special_tokens=True).strip() for x in exs]
    labels = p.evaluate.label_set(p.data)
    if labels and any(m in answers.LABEL_METRICS for m in p.evaluate.metric_names(p.data)):
        bad = next((r for r in refs if answers.match_label(r, labels) is None), None)
        if bad is not None:
            n = refs.index(bad) + 1
            raise UserError(
                f"evaluate.labels: eval example {n}'s answer {bad!r} is none of {labels}"
            )
    return exs, refs


def generated_answers(
    p: Params, model: Any, tok: Any, exs: list[Example], refs: list[str], batch_size: int
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Base and tuned answers to every example: their metrics, and a row per example."""
    stops, prompts = chat.stop_ids(tok, p.data), [x.prompt for x in exs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    texts = {}
    for side in ("tuned", "base"):
        set_seed(p.train.seed)  # sampling (evaluate.do_sample) draws the same for both
        if side == "base":
            with model.disable_adapter():
                new = generate(model, prompts, p.evaluate, stops, pad, batch_size, "generate base")
        else:
            new = generate(model, prompts, p.evaluate, stops, pad, batch_size, "generate tuned")
        texts[side] = [tok.decode(x, skip_special_tokens=True).strip() for x in new]
    names, labels = p.evaluate.metric_names(p.data), p.evaluate.label_set(p.data)
    scores = {side: answers.score(texts[side], refs, names, labels) for side in texts}
    rows = [
        {
            "prompt": tok.decode(x.prompt, skip_special_tokens=True),
            "reference": ref,
            "base": base,
            "tuned": tuned,
        }
        for x, ref, base, tuned in zip(exs, refs, texts["base"], texts["tuned"], strict=True)
    ]
    return scores, rows


def evaluate(
    p: Params,
    tokenized: Path,
    adapter: Path,
    metrics_out: Path,
    samples_out: Path,
    rt: Runtime | None = None,
) -> dict[str, Any]:
    """`rt`: the stage's resolved runtime (resolved for this machine when not given). Answers
    (evaluate.generate) go to generations.jsonl beside `samples_out`, a row per example."""
    task, tok = get_task(p.task), load_tokenizer(p)
    rt = rt or resolve(p, load_config(p))
    data = datasets.load_from_disk(str(tokenized))["eval"]
    generating = p.evaluate.generates(p.task)
    exs, refs = answer_set(p, tok, data) if generating else ([], [])
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
        scores, rows = (
            generated_answers(p, model, tok, exs, refs, rt.eval_batch_size)
            if generating
            else ({"base": {}, "tuned": {}}, [])
        )
        generated = samples(p, model, tok, data)
    key = task.metric
    metrics = {
        **({"perplexity_method": p.evaluate.perplexity} if task.metric == "perplexity" else {}),
        **({"answers": p.evaluate.metric_names(p.data)} if generating else {}),
        "task": p.task,
        "metric": key,
        key: tuned[key],
        "base": {**base, **scores["base"]},
        "tuned": {**tuned, **scores["tuned"]},
        "gain": tuned[key] - base[key],
    }
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_text_atomic(samples_out.with_name("generations.jsonl"), lines)
    write_json(samples_out, generated)
    write_json(metrics_out, metrics)
    return metrics
