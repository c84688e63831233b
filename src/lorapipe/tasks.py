"""What differs between tasks: how rows become tokens, the collator, the model class, the metrics.

One small object per task, so the rest of the code never branches on the task name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from lorapipe import chat
from lorapipe.config import DataParams, Params, UserError
from lorapipe.metrics import perplexity
from lorapipe.packing import IGNORE, PackedCollator, pack, pieces
from lorapipe.sources import at

log = logging.getLogger(__name__)


def _require_column(rows: datasets.Dataset, column: str, key: str, where: str) -> None:
    if column not in rows.column_names:
        raise UserError(f"{where}: no '{column}' column (set {key}; columns: {rows.column_names})")


def _texts(rows: datasets.Dataset, column: str, where: str) -> list[str]:
    texts = rows[column][:]  # a list; list(Column) reads row by row (~2 s per 67k rows)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"{where}: {at(rows, i)}: '{column}' is {text!r}, not text")
    return texts


@dataclass(frozen=True)
class SeqCls:
    """Sentence classification: accuracy, eval loss and confusion counts."""

    name: ClassVar[str] = "seq_cls"
    auto_model: ClassVar[type] = AutoModelForSequenceClassification
    peft_task_type: ClassVar[str] = "SEQ_CLS"  # peft.TaskType's value: peft loads later
    metric: ClassVar[str] = "accuracy"
    token_weighted_loss: ClassVar[bool] = False
    # The new head trains (a PEFT modules_to_save copy): bitsandbytes must leave it a Linear.
    kbit_skip_modules: ClassVar[list[str] | None] = ["classifier", "score"]

    def model_kwargs(self, data: DataParams) -> dict[str, Any]:
        return {"num_labels": data.num_labels}

    def tokenize(
        self,
        rows: datasets.Dataset,
        tok: PreTrainedTokenizerBase,
        p: Params,
        where: str,
        counts: dict[str, int] | None = None,
    ) -> datasets.Dataset:
        d = p.data
        _require_column(rows, d.text_field, "data.text_field", where)
        _require_column(rows, d.label_field, "data.label_field", where)
        texts = _texts(rows, d.text_field, where)
        labels = []
        for i, raw in enumerate(rows[d.label_field][:]):
            try:
                label = int(raw)
                if str(raw).strip() not in (str(label), f"{label}.0"):
                    raise ValueError
            except (TypeError, ValueError):
                raise UserError(
                    f"{where}: {at(rows, i)}: label {raw!r} is not an integer"
                ) from None
            if not 0 <= label < d.num_labels:
                raise UserError(
                    f"{where}: {at(rows, i)}: label {label} is outside 0..{d.num_labels - 1} "
                    "(data.num_labels)"
                )
            labels.append(label)
        enc = tok(texts, truncation=True, max_length=p.tokenize.max_length)
        if counts is not None:  # a row at the limit was (almost always) cut there
            size = p.tokenize.max_length
            counts["at_max_length"] = sum(len(ids) == size for ids in enc["input_ids"])
        out = datasets.Dataset.from_dict({**enc, "labels": labels})
        return out.add_column("length", [len(ids) for ids in enc["input_ids"]])

    def collator(self, tok: PreTrainedTokenizerBase, p: Params) -> Any:
        return DataCollatorWithPadding(tok)

    def compute_metrics(self, pred: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    def score_batch(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        labels = batch["labels"]
        pred = logits.argmax(-1)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        n = logits.shape[-1]
        confusion = torch.bincount(labels * n + pred, minlength=n * n).reshape(n, n)
        return {
            "loss_sum": loss.item(),
            "count": len(labels),
            "correct": (pred == labels).sum().item(),
            "confusion": confusion.cpu().numpy(),
        }

    def summarize(self, sums: dict[str, Any]) -> dict[str, Any]:
        return {
            "accuracy": sums["correct"] / sums["count"],
            "loss": sums["loss_sum"] / sums["count"],
            "examples": sums["count"],
            "confusion": sums["confusion"].tolist(),
        }


@dataclass(frozen=True)
class CausalLM:
    """Language modelling on plain text: every token but a document's first is a target."""

    name: ClassVar[str] = "causal_lm"
    auto_model: ClassVar[type] = AutoModelForCausalLM
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    metric: ClassVar[str] = "perplexity"
    token_weighted_loss: ClassVar[bool] = True
    kbit_skip_modules: ClassVar[list[str] | None] = None  # transformers' own list (lm_head)
    compute_metrics: ClassVar[None] = None  # eval loss only: logits over a vocab are too big

    def model_kwargs(self, data: DataParams) -> dict[str, Any]:
        return {}

    def documents(
        self, rows: datasets.Dataset, tok: PreTrainedTokenizerBase, p: Params, where: str
    ) -> list[list[int]]:
        """Each non-blank text's ids + EOS (a blank line has nothing to learn)."""
        column = p.data.text_field
        _require_column(rows, column, "data.text_field", where)
        texts = [t for t in _texts(rows, column, where) if t.strip()]
        if not texts:
            raise UserError(f"{where}: no non-empty text in '{column}'")
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return [[*x, tok.eos_token_id] for x in ids]

    def tokenize(
        self,
        rows: datasets.Dataset,
        tok: PreTrainedTokenizerBase,
        p: Params,
        where: str,
        counts: dict[str, int] | None = None,
    ) -> datasets.Dataset:
        size, docs = p.tokenize.max_length, self.documents(rows, tok, p, where)
        if p.tokenize.layout == "pad":
            if counts is not None:
                counts["truncated"] = sum(len(x) > size for x in docs)
            rows_ids = [[*x[:-1][: size - 1], x[-1]] for x in docs]  # truncated, EOS kept
            return _causal_dataset(rows_ids, [list(x) for x in rows_ids])
        # Pack: a document longer than a block is cut into pieces, each a document of its own.
        return _packed_dataset([pc for x in docs for pc in pieces(x, x, size)], size)

    def stream(
        self, rows: datasets.Dataset, tok: PreTrainedTokenizerBase, p: Params, where: str
    ) -> datasets.Dataset:
        """The eval text in its order, a row per document: evaluate.perplexity: sliding_window."""
        return datasets.Dataset.from_dict({"input_ids": self.documents(rows, tok, p, where)})

    def collator(self, tok: PreTrainedTokenizerBase, p: Params) -> Any:
        if p.tokenize.layout == "pack":
            return PackedCollator()  # one flattened row: every attention sees the boundaries
        # `pad`: causal_lm pads every row to max_length, as hand-written scripts do; sft per batch.
        padding = "max_length" if self.name == "causal_lm" else True
        return DataCollatorForSeq2Seq(
            tok, padding=padding, max_length=p.tokenize.max_length, label_pad_token_id=IGNORE
        )

    def score_batch(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        # Shift so that position t predicts token t+1, as the model's own loss does.
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        return {"nll_sum": nll.item(), "tokens": (labels != IGNORE).sum().item()}

    def summarize(self, sums: dict[str, Any]) -> dict[str, Any]:
        loss = sums["nll_sum"] / sums["tokens"]
        return {
            "loss": loss,
            "perplexity": perplexity(sums["nll_sum"], sums["tokens"]),
            "tokens": sums["tokens"],
        }


@dataclass(frozen=True)
class SFT(CausalLM):
    """Prompt → response (data.format, lorapipe.chat): loss on the response tokens only."""

    name: ClassVar[str] = "sft"

    def tokenize(
        self,
        rows: datasets.Dataset,
        tok: PreTrainedTokenizerBase,
        p: Params,
        where: str,
        counts: dict[str, int] | None = None,
    ) -> datasets.Dataset:
        """`counts`, when given, receives the rows dropped (no response token within
        tokenize.max_length) and those whose response was cut."""
        size, docs, dropped, cut = p.tokenize.max_length, [], [], 0
        for n, (ids, labels) in enumerate(chat.encode(rows, tok, p.data, where)):
            if any(x != IGNORE for x in labels[:size]):  # else nothing to learn within max_length
                docs.append((ids[:size], labels[:size]))
                cut += any(x != IGNORE for x in labels[size:])
            else:
                dropped.append(n)
        if not docs:
            raise UserError(f"{where}: every prompt is longer than tokenize.max_length={size}")
        if dropped:
            log.warning(
                "%s: dropped %d of %d rows whose prompt fills tokenize.max_length=%d (first: %s)",
                where,
                len(dropped),
                len(rows),
                size,
                at(rows, dropped[0]),
            )
        if cut:
            log.warning(
                "%s: %d of %d responses cut at tokenize.max_length=%d", where, cut, len(docs), size
            )
        if counts is not None:
            counts.update(dropped_long_prompt=len(dropped), truncated_response=cut)
        if p.tokenize.layout == "pack":
            return _packed_dataset(docs, size)
        return _causal_dataset([d[0] for d in docs], [d[1] for d in docs])


def _causal_dataset(ids: list[list[int]], labels: list[list[int]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * len(x) for x in ids],
            "labels": labels,
            "length": [len(x) for x in ids],
        }
    )


def _packed_dataset(docs: list[tuple[list[int], list[int]]], size: int) -> datasets.Dataset:
    blocks = pack(docs, size)
    return datasets.Dataset.from_dict({**blocks, "length": [len(x) for x in blocks["input_ids"]]})


TASKS = {t.name: t for t in (SeqCls(), CausalLM(), SFT())}


def get_task(name: str) -> SeqCls | CausalLM | SFT:
    return TASKS[name]
