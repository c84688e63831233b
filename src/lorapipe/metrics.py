"""Evaluation sums over a whole data set, turned into metrics once at the end."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader

from lorapipe import progress
from lorapipe.packing import model_inputs


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean token NLL) over all target tokens: sums across batches, never a mean of means."""
    if tokens <= 0:
        raise ValueError("perplexity needs at least one target token")
    return math.exp(nll_sum / tokens)


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
