"""Packing without cross-talk: whole documents in blocks, positions restarting at each one.

A packed batch is one flattened row (padding-free, as TRL's DataCollatorWithFlattening and
Axolotl's multipack feed it): the batch's blocks end to end, `position_ids` restarting at 0 at
each document, no attention_mask. Every attention implementation the runtime can pick reads
document boundaries from that row alone: flash-attention only from a batch of ONE row
(modeling_flash_attention_utils._is_packed_sequence, then flash_attn_varlen_func with
cu_seqlens from the restarts); sdpa, eager and flex build a block-diagonal causal mask from
restarting positions (masking_utils.find_packed_sequence_indices), but only with no
attention_mask and no KV cache, so every forward on packed batches passes use_cache=False
(`model_inputs`). A batch of several packed rows would run plain causal attention over each
whole row under flash.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import datasets
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
    """Packed blocks flattened into one row of all their tokens: [1, sum of lengths].

    B blocks of up to L tokens become one row of up to B·L: the same tokens per step as B rows,
    with no padding at all. Every document's first label is IGNORE, whatever the row says, so
    no loss crosses a document (or block) boundary: the targets, and their count
    (Trainer's num_items_in_batch counts labels[..., 1:]), are exactly those of the rows run
    one by one. Hand-written rather than transformers' DataCollatorWithFlattening: that one
    numbers positions per row (a row is one sequence to it), not per document inside a block.
    """

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for r in rows:
            ids += r["input_ids"]
            positions += r["position_ids"]
            labels += [
                IGNORE if pos == 0 else lab
                for lab, pos in zip(r["labels"], r["position_ids"], strict=True)
            ]
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
        return {k: torch.tensor([v], dtype=torch.long) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor], device: Any) -> dict[str, Any]:
    """A collated batch as forward() kwargs: no labels or lengths, no cache for packed blocks."""
    inputs: dict[str, Any] = {
        k: v.to(device) for k, v in batch.items() if k not in ("labels", "length")
    }
    if "position_ids" in inputs and "attention_mask" not in inputs:
        if inputs["position_ids"].shape[0] != 1:  # flash would attend across its documents
            raise ValueError("a packed batch must be one flattened row (PackedCollator)")
        inputs["use_cache"] = False  # a KV cache would switch the packed-sequence mask off
    return inputs


def first_document(row: dict[str, Any]) -> dict[str, Any]:
    """The first document of a packed row (a row without position_ids is one document)."""
    positions = row.get("position_ids")
    if positions is None:
        return row
    end = next((i for i in range(1, len(positions)) if positions[i] == 0), len(positions))
    return {k: v[:end] if isinstance(v, list) else v for k, v in row.items()}


def causal_dataset(ids: list[list[int]], labels: list[list[int]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * len(x) for x in ids],
            "labels": labels,
            "length": [len(x) for x in ids],
        }
    )


def packed_dataset(docs: list[tuple[list[int], list[int]]], size: int) -> datasets.Dataset:
    blocks = pack(docs, size)
    return datasets.Dataset.from_dict({**blocks, "length": [len(x) for x in blocks["input_ids"]]})
