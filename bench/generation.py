"""Generation: the evaluate stage's batched, left-padded generation against one prompt at a time.

The sst2-smollm2-generate recipe's model (SmolLM2-135M-Instruct) and prompts (SST-2 dev as
instructions, through the chat template), greedy, evaluate.max_new_tokens new tokens: the same
rows, model and settings on both sides, and the same answers (greedy is deterministic; checked).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.harness import ROOT, row_text
from lorapipe import chat
from lorapipe.config import Params
from lorapipe.data_sources import load_rows
from lorapipe.evaluation import answer_set
from lorapipe.generation import generate
from lorapipe.modeling import load_base, load_config, load_tokenizer
from lorapipe.recipes import recipe_params
from lorapipe.runtime import autocast, resolve
from lorapipe.tasks import get_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generation-rows", type=int, help="SST-2 dev prompts (64; quick 8)")
    parser.add_argument("--generation-batch", type=int, default=16, help="batched side's batch")


def run(args: argparse.Namespace, _: Params) -> dict[str, Any]:
    rows = args.generation_rows or (8 if args.quick else 64)
    p = recipe_params("sst2-smollm2-generate")
    data_params = p.data.model_copy(
        update={"eval": str(ROOT / "data/raw/sst2/dev.tsv"), "max_eval_rows": rows}
    )
    p = p.model_copy(update={"data": data_params})
    tok, rt = load_tokenizer(p), resolve(p, load_config(p))
    eval_rows = load_rows(p.data.eval, "data.eval").select(range(rows))
    data = get_task("sft").tokenize(eval_rows, tok, p, "data.eval")
    exs, _ = answer_set(p, tok, data)
    model = load_base(p, rt, tok.pad_token_id)
    stops, prompts = chat.stop_ids(tok, p.data), [x.prompt for x in exs]
    out: dict[str, Any] = {"rows": len(prompts), "max_new_tokens": p.evaluate.max_new_tokens}
    answers = {}
    with autocast(rt):
        for side, batch in (("one_at_a_time", 1), ("batched", args.generation_batch)):
            start = time.perf_counter()
            answers[side] = generate(model, prompts, p.evaluate, stops, tok.pad_token_id, batch)
            seconds = time.perf_counter() - start
            out[side] = {"batch": batch, "examples_per_s": round(len(prompts) / seconds, 2)}
    out["same_answers"] = answers["batched"] == answers["one_at_a_time"]
    out["speedup"] = round(
        out["batched"]["examples_per_s"] / out["one_at_a_time"]["examples_per_s"], 2
    )
    return out


def lines(result: dict[str, Any]) -> list[str]:
    one, batched = result["one_at_a_time"], result["batched"]
    return [
        row_text(
            f"generation ({result['rows']} SST-2 prompts, SmolLM2, greedy)",
            f"{one['examples_per_s']} ex/s one at a time",
            f"{batched['examples_per_s']} ex/s batched ({batched['batch']})",
            f"{result['speedup']}x, same answers: {result['same_answers']}",
        )
    ]
