"""Packing without cross-talk: whole documents in blocks, positions restarting at each one.

transformers turns restarting `position_ids` into a block-diagonal causal mask (sdpa, eager,
flex), but only for a batch with no attention_mask and no KV cache
(masking_utils.find_packed_sequence_indices): so packed batches carry position_ids and no mask,
and every forward on them passes use_cache=False (`model_inputs`). Its flash-attention path
reads packing from position_ids only in a batch of one flattened row (_is_packed_sequence);
the pipeline loads sdpa.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100  # the label id that cross-entropy skips


def pieces(ids: list[int], labels: list[int], size: int) -> list[tuple[list[int], list[int]]]:
    """A document cut into pieces of at most `size` tokens; each piece is a document of its own."""
    return [(ids[i : i + size], labels[i : i + size]) for i in range(0, len(ids), size)]


def pack(docs: list[tuple[list[int], list[int]]], size: int) -> dict[str, list[list[int]]]:
    """Documents (ids, labels), each at most `size` long, placed whole into blocks of <= size.

    Best-fit decreasing (each document, longest first, goes to the fullest block it fits):
    blocks come out nearly full and no document is split, so a token sees exactly the context
    it would see alone. Each document's first label is IGNORE: nothing in its block may predict
    it. Hand-written: transformers and datasets have no packer that keeps documents whole.
    """
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i][0]))  # stable: ties keep order
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, block), sorted: bisect finds the best fit
    for i in order:
        need = len(docs[i][0])
        j = bisect.bisect_left(free, (need, -1))
        if j == len(free):
            blocks.append([i])
            room, block = size - need, len(blocks) - 1
        else:
            room, block = free.pop(j)
            blocks[block].append(i)
            room -= need
        if room:
            bisect.insort(free, (room, block))
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for block in blocks:
        ids, labels, positions = [], [], []
        for i in sorted(block):  # documents in their original order inside a block
            d_ids, d_labels = docs[i]
            ids += d_ids
            labels += [IGNORE, *d_labels[1:]]
            positions += range(len(d_ids))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
    return out


@dataclass(frozen=True)
class PackedCollator:
    """Pads packed blocks to the batch's longest with a padding document of its own.

    No attention_mask on purpose (see the module docstring); the padding sits after every real
    token, so causal attention never lets a real token see it, and its labels are IGNORE.
    Hand-written: transformers' collators either add an attention_mask or flatten the batch.
    """

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            gap = width - len(r["input_ids"])
            batch["input_ids"].append([*r["input_ids"], *[self.pad_token_id] * gap])
            batch["labels"].append([*r["labels"], *[IGNORE] * gap])
            batch["position_ids"].append([*r["position_ids"], *range(gap)])
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor], device: Any) -> dict[str, Any]:
    """A collated batch as forward() kwargs: no labels or lengths, no cache for packed blocks."""
    inputs: dict[str, Any] = {
        k: v.to(device) for k, v in batch.items() if k not in ("labels", "length")
    }
    if "position_ids" in inputs and "attention_mask" not in inputs:
        inputs["use_cache"] = False  # a KV cache would switch the packed-sequence mask off
    return inputs


def first_document(row: dict[str, Any]) -> dict[str, Any]:
    """The first document of a packed row (a row without position_ids is one document)."""
    positions = row.get("position_ids")
    if positions is None:
        return row
    end = next((i for i in range(1, len(positions)) if positions[i] == 0), len(positions))
    return {k: v[:end] if isinstance(v, list) else v for k, v in row.items()}
