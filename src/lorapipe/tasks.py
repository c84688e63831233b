"""What differs between tasks: how rows become tokens, the collator, the model class, the metrics.

One small object per task, so the rest of the code never branches on the task name.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
from peft import TaskType
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from lorapipe.config import DataParams, Params, UserError
from lorapipe.metrics import perplexity

IGNORE = -100  # the label id that cross-entropy skips


def _require_column(rows: datasets.Dataset, column: str, key: str, where: str) -> None:
    if column not in rows.column_names:
        raise UserError(f"{where}: no '{column}' column (set {key}; columns: {rows.column_names})")


def _texts(rows: datasets.Dataset, column: str, where: str) -> list[str]:
    texts = rows[column][:]  # a list; list(Column) reads row by row (~2 s per 67k rows)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"{where}: row {i + 1}: '{column}' is {text!r}, not text")
    return texts


@dataclass(frozen=True)
class SeqCls:
    """Sentence classification: accuracy, eval loss and confusion counts."""

    name: ClassVar[str] = "seq_cls"
    auto_model: ClassVar[type] = AutoModelForSequenceClassification
    peft_task_type: ClassVar[TaskType] = TaskType.SEQ_CLS
    metric: ClassVar[str] = "accuracy"
    token_weighted_loss: ClassVar[bool] = False
    # The new head trains (a PEFT modules_to_save copy): bitsandbytes must leave it a Linear.
    kbit_skip_modules: ClassVar[list[str] | None] = ["classifier", "score"]

    def model_kwargs(self, data: DataParams) -> dict[str, Any]:
        return {"num_labels": data.num_labels}

    def tokenize(
        self, rows: datasets.Dataset, tok: PreTrainedTokenizerBase, p: Params, where: str
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
                raise UserError(f"{where}: row {i + 1}: label {raw!r} is not an integer") from None
            if not 0 <= label < d.num_labels:
                raise UserError(
                    f"{where}: row {i + 1}: label {label} is outside 0..{d.num_labels - 1} "
                    "(data.num_labels)"
                )
            labels.append(label)
        enc = tok(texts, truncation=True, max_length=p.tokenize.max_length)
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
    """Language modelling on plain text: every non-pad token is a target; perplexity."""

    name: ClassVar[str] = "causal_lm"
    auto_model: ClassVar[type] = AutoModelForCausalLM
    peft_task_type: ClassVar[TaskType] = TaskType.CAUSAL_LM
    metric: ClassVar[str] = "perplexity"
    token_weighted_loss: ClassVar[bool] = True
    kbit_skip_modules: ClassVar[list[str] | None] = None  # transformers' own list (lm_head)
    compute_metrics: ClassVar[None] = None  # eval loss only: logits over a vocab are too big

    def model_kwargs(self, data: DataParams) -> dict[str, Any]:
        return {}

    def tokenize(
        self, rows: datasets.Dataset, tok: PreTrainedTokenizerBase, p: Params, where: str
    ) -> datasets.Dataset:
        column = p.data.text_field
        _require_column(rows, column, "data.text_field", where)
        texts = [
            t for t in _texts(rows, column, where) if t.strip()
        ]  # a blank line has nothing to learn
        if not texts:
            raise UserError(f"{where}: no non-empty text in '{column}'")
        size = p.tokenize.max_length
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        if p.tokenize.layout == "pad":
            rows_ids = [[*x[: size - 1], tok.eos_token_id] for x in ids]
        else:
            # Pack: documents joined by EOS and cut into full blocks, so no batch carries padding.
            stream = list(itertools.chain.from_iterable([*x, tok.eos_token_id] for x in ids))
            rows_ids = [stream[i : i + size] for i in range(0, len(stream) - size + 1, size)]
            if not rows_ids:
                raise UserError(f"{where}: fewer than tokenize.max_length={size} tokens in all")
        return _causal_dataset(rows_ids, [list(x) for x in rows_ids])

    def collator(self, tok: PreTrainedTokenizerBase, p: Params) -> Any:
        # `pad` pads every row to max_length, as hand-written scripts do; pack/sft pad per batch.
        padding = "max_length" if self.name == "causal_lm" and p.tokenize.layout == "pad" else True
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
    """Prompt → response: text = input + separator + output + EOS; loss on the response only."""

    name: ClassVar[str] = "sft"

    def prompt_and_response(
        self, tok: PreTrainedTokenizerBase, d: DataParams, inp: str, out: str
    ) -> tuple[list[int], list[int]]:
        if d.chat_template:
            user = [{"role": "user", "content": inp}]
            prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template(
                [*user, {"role": "assistant", "content": out}], tokenize=False
            )
            if not full.startswith(prompt):
                raise UserError("data.chat_template: the template does not extend the prompt")
            response = full[len(prompt) :]
        else:
            prompt, response = inp + d.separator, out
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return p_ids, r_ids

    def tokenize(
        self, rows: datasets.Dataset, tok: PreTrainedTokenizerBase, p: Params, where: str
    ) -> datasets.Dataset:
        d, size = p.data, p.tokenize.max_length
        _require_column(rows, d.input_field, "data.input_field", where)
        _require_column(rows, d.output_field, "data.output_field", where)
        inputs = _texts(rows, d.input_field, where)
        outputs = _texts(rows, d.output_field, where)
        ids, labels = [], []
        for inp, out in zip(inputs, outputs, strict=True):
            p_ids, r_ids = self.prompt_and_response(tok, d, inp, out)
            if len(p_ids) >= size:
                continue  # no room for a single response token: nothing to learn from this row
            row = (p_ids + r_ids)[:size]
            ids.append(row)
            labels.append(([IGNORE] * len(p_ids) + r_ids)[:size])
        if not ids:
            raise UserError(f"{where}: every prompt is longer than tokenize.max_length={size}")
        return _causal_dataset(ids, labels)


def _causal_dataset(ids: list[list[int]], labels: list[list[int]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * len(x) for x in ids],
            "labels": labels,
            "length": [len(x) for x in ids],
        }
    )


TASKS = {t.name: t for t in (SeqCls(), CausalLM(), SFT())}


def get_task(name: str) -> SeqCls | CausalLM | SFT:
    return TASKS[name]
