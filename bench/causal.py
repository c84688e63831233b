"""Causal LM: a padded row per WikiText line (the tutorial) against the pipeline's packed blocks.

SmolLM2-135M + LoRA, fp32, on WikiText-2 valid from ../shared: real-token fraction at
128/256/512, throughput and held-out perplexity at one length.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import datasets
from peft import get_peft_model
from transformers import DataCollatorForLanguageModeling, set_seed

from bench.harness import (
    SMOLLM2,
    WIKITEXT,
    pipeline_train,
    real_token_fraction,
    release,
    reset_peak_rss,
    resources,
    runtime,
    score,
    side_result,
    tutorial_train,
)
from lorapipe.config import Params, parse_params
from lorapipe.data import tokenize
from lorapipe.data_sources import load_rows
from lorapipe.lora import lora_config
from lorapipe.modeling import load_base, load_tokenizer
from lorapipe.tasks import get_task

CAUSAL_LENGTHS = (128, 256, 512)


def causal_params(train: Path, heldout: Path, max_length: int, args: argparse.Namespace) -> Params:
    return parse_params(
        {
            "task": "causal_lm",
            "data": {"train": str(train), "eval": str(heldout), "text_field": "text"},
            "model": {"name": SMOLLM2},
            "tokenize": {"max_length": max_length, "layout": "pack"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
            "quant": {"bits": "none"},  # full precision fp32, on both sides
            "train": {
                "seed": 42,
                "batch_size": args.causal_batch,
                "max_steps": args.causal_steps,
                "learning_rate": 2e-4,
                "mixed_precision": "no",
                "eval_strategy": "no",
            },
            "evaluate": {"batch_size": args.causal_batch},
        },
        "bench",
    )


def tutorial_lines(lines: list[str], tok: Any, max_length: int) -> datasets.Dataset:
    """A hand-written script's layout: every line of the file a row (the blank lines between
    paragraphs too, as `load_dataset("text")` gives them), each padded to max_length."""
    enc = tok(lines, padding="max_length", truncation=True, max_length=max_length)
    return datasets.Dataset.from_dict(dict(enc))


def causal(args: argparse.Namespace) -> dict[str, Any]:
    if not WIKITEXT.is_file():
        return {"skipped": f"{WIKITEXT} not found (../shared is optional)"}
    lines = WIKITEXT.read_text(encoding="utf-8").splitlines()
    cut = len(lines) - len(lines) // 20  # the last 5 % of lines: held-out text for perplexity
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_txt, heldout_txt = root / "train.txt", root / "heldout.txt"
        train_txt.write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
        heldout_txt.write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")
        p = causal_params(train_txt, heldout_txt, args.causal_length, args)
        tok = load_tokenizer(p)  # pad token := EOS if none, as in the stages

        # Real tokens in each layout over the whole file: the tutorial's pad layout, and
        # packing as the tokenize stage writes it (full blocks only).
        efficiency = {}
        file_rows = load_rows(str(WIKITEXT), "data.train")
        for length in CAUSAL_LENGTHS:
            pad = [sum(m) for m in tutorial_lines(lines, tok, length)["attention_mask"][:]]
            packed = get_task("causal_lm").tokenize(
                file_rows, tok, causal_params(WIKITEXT, WIKITEXT, length, args), "data.train"
            )
            efficiency[str(length)] = {
                "pad": {"rows": len(pad), "real_token_fraction": real_token_fraction(pad, length)},
                "pack": {
                    "rows": len(packed),
                    "real_token_fraction": real_token_fraction(packed["length"][:], length),
                },
                "ceiling_speedup": round(len(pad) * length / sum(pad), 2),
            }
        tokenized = root / "tokenized"
        tokenize(p, tokenized)  # the tokenize stage, untimed: packed train and held-out blocks
        stage_data = datasets.load_from_disk(str(tokenized))

        # Throughput at one length over a fixed number of steps; timed from the end of step 1 to
        # the end of the last, so one-time costs stay out of so short a run.
        scoped = reset_peak_rss()
        set_seed(p.train.seed)
        base = load_base(p, runtime(p), tok.pad_token_id)
        tutorial_model = get_peft_model(base, lora_config(p))
        collator = DataCollatorForLanguageModeling(tok, mlm=False)  # pad positions -> label -100
        rows = tutorial_lines(lines[:cut], tok, args.causal_length)
        meter = tutorial_train(tutorial_model, p, rows, collator)
        seconds = meter.step_ends[-1] - meter.step_ends[0]
        pad = {**side_result(meter, seconds, skip=1), **resources(scoped)}
        pad["epoch_real_token_fraction"] = real_token_fraction(
            [sum(m) for m in rows["attention_mask"][:]], args.causal_length
        )

        scoped = reset_peak_rss()
        meter, model = pipeline_train(p, tokenized, root / "pipeline")
        seconds = meter.step_ends[-1] - meter.step_ends[0]
        pack = {**side_result(meter, seconds, skip=1), **resources(scoped)}
        pack["epoch_real_token_fraction"] = real_token_fraction(
            stage_data["train"]["length"][:], args.causal_length
        )
        # A few timed steps see a few random rows, whose share of real tokens is noise (20 rows
        # of WikiText lines: 15 to 40 %, 9 times in 10). Every batch has the same shape, so the
        # time per computed token is the measurement, and an epoch computes on all the rows:
        # useful tokens/s over an epoch = computed tokens/s x the epoch's real-token fraction.
        for side in (pad, pack):
            side["real_tokens_per_s_over_an_epoch"] = round(
                side["computed_tokens_per_s"] * side["epoch_real_token_fraction"], 1
            )
        # Perplexity after the same number of steps, on the held-out text as the stage packs it.
        heldout = stage_data["eval"].select(
            range(min(args.heldout_blocks, len(stage_data["eval"])))
        )
        pad["heldout_perplexity"] = round(score(p, tutorial_model, heldout, tok)["perplexity"], 2)
        pack["heldout_perplexity"] = round(score(p, model, heldout, tok)["perplexity"], 2)
        del tutorial_model, model
        release()
    return {
        "model": SMOLLM2,
        "text": str(WIKITEXT),
        "lines": len(lines),
        "blank_lines": sum(not line.strip() for line in lines),
        "efficiency": efficiency,
        "throughput_max_length": args.causal_length,
        "batch_size": args.causal_batch,
        "throughput": {"pad": pad, "pack": pack},
        "heldout_tokens": sum(heldout["length"][:]),
        "speedup_real_tokens_per_s": round(
            pack["real_tokens_per_s_over_an_epoch"] / pad["real_tokens_per_s_over_an_epoch"], 2
        ),
        "speedup_real_tokens_per_s_timed_batches": round(
            pack["real_tokens_per_s"] / pad["real_tokens_per_s"], 2
        ),
        "ceiling_speedup": efficiency[str(args.causal_length)]["ceiling_speedup"],
        # Both sides compute on batches of one shape (batch x max_length), so this should be
        # close to 1; far from it, the machine was busier during one side than the other.
        "computed_tokens_per_s_ratio": round(
            pack["computed_tokens_per_s"] / pad["computed_tokens_per_s"], 2
        ),
    }
