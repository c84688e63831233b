"""Classification: every row padded to 128 + a random sampler (the tutorial) against the
pipeline's own tokenize and train stages (dynamic padding, length-grouped batches).

all-MiniLM-L6-v2 + LoRA on the committed SST-2 sample: train samples/s, real tokens/s, dev
accuracy, on the same seeded rows.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import datasets
from peft import get_peft_model
from transformers import default_data_collator, set_seed

from bench.harness import (
    pipeline_train,
    release,
    reset_peak_rss,
    resources,
    runtime,
    score,
    side_result,
    sst2_subset,
    tutorial_train,
)
from lorapipe.config import Params
from lorapipe.lora import lora_config
from lorapipe.modeling import load_base, load_tokenizer

TUTORIAL_MAX_LENGTH = 128


def tutorial_tokenize(rows: datasets.Dataset, tok: Any, p: Params) -> datasets.Dataset:
    """What most tutorials do: pad every row to max_length once, at tokenization."""
    enc = tok(
        rows[p.data.text_field][:],
        padding="max_length",
        truncation=True,
        max_length=TUTORIAL_MAX_LENGTH,
    )
    labels = [int(x) for x in rows[p.data.label_field][:]]
    return datasets.Dataset.from_dict({**enc, "labels": labels})


def classification(args: argparse.Namespace, p: Params) -> dict[str, Any]:
    train_update = {
        "epochs": args.epochs,
        "batch_size": args.batch_size or p.train.batch_size,
        "eval_strategy": "no",  # both sides are scored after training, the same way
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # The same seeded rows on both sides; the pipeline trains on the tokenize stage's output,
        # both sides score `dev`.
        p, rows, dev = sst2_subset(p, args.train_rows, args.eval_rows, train_update, root)
        tok = load_tokenizer(p)
        tokenized = root / "tokenized"

        scoped = reset_peak_rss()
        set_seed(p.train.seed)  # the same LoRA init and classifier head as the stage's
        model = get_peft_model(load_base(p, runtime(p), tok.pad_token_id), lora_config(p))
        # Rows already all 128 long: nothing left to pad.
        meter = tutorial_train(model, p, tutorial_tokenize(rows, tok, p), default_data_collator)
        tutorial = {**side_result(meter, meter.end - meter.start), **resources(scoped)}
        tutorial["accuracy"] = round(score(p, model, dev, tok)["accuracy"], 4)
        del model
        release()

        scoped = reset_peak_rss()
        meter, model = pipeline_train(p, tokenized, root / "pipeline")
        pipeline = {**side_result(meter, meter.end - meter.start), **resources(scoped)}
        pipeline["accuracy"] = round(score(p, model, dev, tok)["accuracy"], 4)
        del model
        release()
    positive = sum(dev["labels"][:]) / len(dev)
    return {
        "model": p.model.name,
        "train_rows": len(rows),
        "eval_rows": len(dev),
        "epochs": p.train.epochs,
        "batch_size": p.train.batch_size,
        "lora": p.lora.model_dump(),
        "tutorial": tutorial,
        "pipeline": pipeline,
        "speedup_samples_per_s": round(pipeline["samples_per_s"] / tutorial["samples_per_s"], 2),
        "speedup_real_tokens_per_s": round(
            pipeline["real_tokens_per_s"] / tutorial["real_tokens_per_s"], 2
        ),
        # The same rows, so this is how much less the pipeline computes: the speedup to expect
        # when a computed token costs the same on both sides.
        "work_ratio": round(tutorial["computed_tokens"] / pipeline["computed_tokens"], 2),
        "accuracy_delta_points": round(100 * (pipeline["accuracy"] - tutorial["accuracy"]), 2),
        # What always answering the commoner label scores: accuracy at or near it means the
        # run was too short to learn anything, and then equal accuracies prove nothing.
        "majority_class_accuracy": round(max(positive, 1 - positive), 4),
    }
