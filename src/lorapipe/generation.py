"""Answers generated over the whole eval split: the prompts and references of an sft eval set,
and batched generation with left padding.

An example is one document of the tokenized eval split (a packed block holds several): its
prompt is every token before the first labelled one, its reference the first labelled run
(the first answer, without its stop token). Generation is greedy unless evaluate.do_sample,
stops at EOS or the template's end-of-turn token, and writes at most evaluate.max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import datasets
import torch

from lorapipe import progress
from lorapipe.packing import IGNORE
from lorapipe.sections_run import EvaluateParams


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    reference: list[int]


def documents(row: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each document of a row: packed rows split where positions restart."""
    positions = row.get("position_ids")
    if positions is None:
        return [(row["input_ids"], row["labels"])]
    starts = [i for i, pos in enumerate(positions) if pos == 0] + [len(positions)]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in pairwise(starts)]


def examples(data: datasets.Dataset, stops: list[int]) -> list[Example]:
    """An Example per document that has an answer, in the split's order."""
    out = []
    for row in data:
        for ids, labels in documents(row):
            first = next((i for i, lab in enumerate(labels) if lab != IGNORE), None)
            if first is None:
                continue
            end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE), len(labels))
            answer = ids[first:end]
            while answer and answer[-1] in stops:
                answer = answer[:-1]
            out.append(Example(ids[:first], answer))
    return out


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


def generate(
    model: Any,
    prompts: list[list[int]],
    e: EvaluateParams,
    stops: list[int],
    pad_id: int,
    batch_size: int,
    label: str = "generate",
) -> list[list[int]]:
    """The new tokens of each prompt (stop token cut), in the prompts' order.

    Batches of similar length, longest first (a batch that does not fit fails at once), left
    padded so every row's next token follows its own last one."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    sampling = {"do_sample": True, "temperature": e.temperature, "top_p": e.top_p}
    out: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for batch in progress.bar(batches, label, unit="batch"):
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            new = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=e.max_new_tokens,
                eos_token_id=stops,
                pad_token_id=pad_id,
                **(sampling if e.do_sample else {"do_sample": False}),
            )[:, width:]
            for row, i in enumerate(batch):
                out[i] = cut_at_stop(new[row].tolist(), stops)
    return out
