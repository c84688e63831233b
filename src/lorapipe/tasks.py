"""What differs between tasks: how rows become tokens, the collator, the model class, the metrics.

One small object per task, so the rest of the code never branches on the task name, except
where it must answer before torch loads: the params schema (which keys a task reads),
data_sources' column check and the CLI's refusal of predict or generate for the wrong task.
"""

from __future__ import annotations

import logging
import math
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
from lorapipe.config import Params, UserError
from lorapipe.data_sources import at, column_texts, label_counts, require_column
from lorapipe.packing import IGNORE, PackedCollator, causal_dataset, packed_dataset, pieces
from lorapipe.sections_model import DataParams

log = logging.getLogger(__name__)


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean token NLL) over all target tokens: sums across batches, never a mean of means."""
    if tokens <= 0:
        raise ValueError("perplexity needs at least one target token")
    return math.exp(nll_sum / tokens)


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

    def model_kwargs(self, num_labels: int) -> dict[str, Any]:
        return {"num_labels": num_labels}

    def tokenize(
        self,
        rows: datasets.Dataset,
        tok: PreTrainedTokenizerBase,
        p: Params,
        where: str,
        counts: dict[str, int] | None = None,
    ) -> datasets.Dataset:
        d = p.data
        require_column(rows, d.text_field, "data.text_field", where)
        require_column(rows, d.label_field, "data.label_field", where)
        texts = column_texts(rows, d.text_field, where)
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

    def split_meta(self, splits: dict[str, datasets.Dataset], p: Params) -> dict[str, Any]:
        """tokenize's meta.json: each split's label counts (a warning for a rare class)."""
        n = p.data.num_labels
        labels = {k: label_counts(s["labels"][:], n, f"data.{k}") for k, s in splits.items()}
        return {"labels": labels}

    def extra_splits(
        self, rows: datasets.Dataset, tok: PreTrainedTokenizerBase, p: Params
    ) -> dict[str, datasets.Dataset]:
        return {}

    def eval_logits(self, p: Params, vocab_size: int) -> int:
        """Logits one eval row holds at once: a score per label."""
        return p.data.num_labels

    def collator(self, tok: PreTrainedTokenizerBase, p: Params) -> Any:
        return DataCollatorWithPadding(tok)

    def sample(self, model: Any, tok: PreTrainedTokenizerBase, row: dict, p: Params) -> dict:
        """One eval row through the tuned model: its label, the predicted one, the probability."""
        ids = torch.tensor([row["input_ids"]], device=next(model.parameters()).device)
        probs = model(input_ids=ids).logits.softmax(-1)[0]
        return {
            "text": tok.decode(row["input_ids"], skip_special_tokens=True),
            "label": row["labels"],
            "predicted": int(probs.argmax()),
            "probability": round(float(probs.max()), 4),
        }

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

    def model_kwargs(self, num_labels: int) -> dict[str, Any]:
        return {}

    def documents(
        self, rows: datasets.Dataset, tok: PreTrainedTokenizerBase, p: Params, where: str
    ) -> list[list[int]]:
        """Each non-blank text's ids + EOS (a blank line has nothing to learn)."""
        column = p.data.text_field
        require_column(rows, column, "data.text_field", where)
        texts = [t for t in column_texts(rows, column, where) if t.strip()]
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
            return causal_dataset(rows_ids, [list(x) for x in rows_ids])
        # Pack: a document longer than a block is cut into pieces, each a document of its own.
        return packed_dataset([pc for x in docs for pc in pieces(x, x, size)], size)

    def stream(
        self, rows: datasets.Dataset, tok: PreTrainedTokenizerBase, p: Params, where: str
    ) -> datasets.Dataset:
        """The eval text in its order, a row per document: evaluate.perplexity: sliding_window."""
        return datasets.Dataset.from_dict({"input_ids": self.documents(rows, tok, p, where)})

    def split_meta(self, splits: dict[str, datasets.Dataset], p: Params) -> dict[str, Any]:
        return {}

    def extra_splits(
        self, rows: datasets.Dataset, tok: PreTrainedTokenizerBase, p: Params
    ) -> dict[str, datasets.Dataset]:
        return {"eval_stream": self.stream(rows, tok, p, "data.eval")}

    def eval_logits(self, p: Params, vocab_size: int) -> int:
        """Logits one eval row holds at once: a score per vocabulary entry at every position."""
        return p.tokenize.max_length * vocab_size

    def prompt(self, tok: PreTrainedTokenizerBase, data: DataParams, text: str) -> str:
        """What `lorapipe generate` continues: the text itself."""
        return text

    def prompt_length(self, row: dict) -> int:
        """An eval sample's prompt: the first quarter of the text."""
        return max(1, len(row["input_ids"]) // 4)

    def sample(self, model: Any, tok: PreTrainedTokenizerBase, row: dict, p: Params) -> dict:
        """One eval row's prompt, its reference continuation and the tuned model's (greedy)."""
        ids = torch.tensor([row["input_ids"]], device=next(model.parameters()).device)
        cut = self.prompt_length(row)
        gen = model.generate(
            input_ids=ids[:, :cut],
            attention_mask=torch.ones_like(ids[:, :cut]),
            max_new_tokens=p.evaluate.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        return {
            "prompt": tok.decode(ids[0, :cut]),
            "reference": tok.decode(ids[0, cut:], skip_special_tokens=True),
            "generated": tok.decode(gen[0, cut:], skip_special_tokens=True),
        }

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

    def extra_splits(
        self, rows: datasets.Dataset, tok: PreTrainedTokenizerBase, p: Params
    ) -> dict[str, datasets.Dataset]:
        return {}  # sliding-window perplexity is for plain text (causal_lm)

    def prompt(self, tok: PreTrainedTokenizerBase, data: DataParams, text: str) -> str:
        """What training put before an answer: the chat template or the separator."""
        chat.require_template(tok, data)
        return chat.prompt_text(tok, data, text)

    def prompt_length(self, row: dict) -> int:
        """An eval sample's prompt: the row's unlabelled prefix."""
        return next(i for i, label in enumerate(row["labels"]) if label != IGNORE)

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
            return packed_dataset(docs, size)
        return causal_dataset([d[0] for d in docs], [d[1] for d in docs])


TASKS = {t.name: t for t in (SeqCls(), CausalLM(), SFT())}


def get_task(name: str) -> SeqCls | CausalLM | SFT:
    return TASKS[name]
