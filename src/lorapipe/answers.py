"""Task metrics of generated answers against references (evaluate.metrics).

Text overlap through the maintained implementations: ROUGE-L from rouge-score, chrF and BLEU
from sacrebleu (corpus-level, their own 0-100 scale). Exact match and token F1 follow the SQuAD
v1.1 script (its normalisation: lower case, no punctuation, no articles, single spaces); they
are hand-written because the script is a few lines and HF `evaluate` fetches it from the hub.
Classification by generation (FinLoRA's way): each answer is mapped to a label of
evaluate.labels by normalised match; an answer that matches none counts as wrong, never dropped.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

TEXT_METRICS = ("exact_match", "token_f1", "rouge_l", "chrf", "bleu")
LABEL_METRICS = ("accuracy", "macro_f1")
METRICS = TEXT_METRICS + LABEL_METRICS
UNMATCHED = None


def label_form(text: str) -> str:
    """Lower case, no punctuation, single spaces: how answers and labels are compared (articles
    stay: a multiple-choice label may be 'A')."""
    return " ".join("".join(ch for ch in text.lower() if ch not in string.punctuation).split())


def normalize(text: str) -> str:
    """SQuAD's normalize_answer: label_form without the articles a, an, the."""
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", label_form(text)).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def match_label(answer: str, labels: list[str]) -> str | None:
    """The label an answer names: the whole normalised answer, else the one label it contains as
    words ('very positive' over 'positive' within it); two different labels: no match."""
    norm = {label_form(label): label for label in labels}
    said = label_form(answer)
    if said in norm:
        return norm[said]
    inside = [n for n in norm if re.search(rf"\b{re.escape(n)}\b", said)]
    inside = [n for n in inside if not any(n != o and n in o for o in inside)]
    return norm[inside[0]] if len(inside) == 1 else UNMATCHED


def label_scores(answers: list[str], references: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 over `labels`; an unmatched answer is a wrong prediction."""
    from sklearn.metrics import f1_score

    truth = [match_label(r, labels) for r in references]
    predicted = [match_label(a, labels) for a in answers]
    missing = next((r for r, t in zip(references, truth, strict=True) if t is None), None)
    if missing is not None:
        raise ValueError(f"the reference {missing!r} is none of evaluate.labels {labels}")
    shown = ["\0unmatched" if x is None else x for x in predicted]
    correct = sum(p == t for p, t in zip(shown, truth, strict=True))
    return {
        "accuracy": correct / len(truth),
        # labels= keeps "unmatched" out of the average: it only costs recall of the true label
        "macro_f1": float(f1_score(truth, shown, labels=labels, average="macro", zero_division=0)),
        "unmatched": sum(x is None for x in predicted),
        "unmatched_share": sum(x is None for x in predicted) / len(truth),
    }


def text_scores(answers: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    pairs = list(zip(answers, references, strict=True))
    if "exact_match" in names:
        out["exact_match"] = sum(normalize(a) == normalize(r) for a, r in pairs) / len(pairs)
    if "token_f1" in names:
        out["token_f1"] = sum(token_f1(a, r) for a, r in pairs) / len(pairs)
    if "rouge_l" in names:
        from rouge_score.rouge_scorer import RougeScorer

        scorer = RougeScorer(["rougeL"], use_stemmer=False)
        out["rouge_l"] = sum(scorer.score(r, a)["rougeL"].fmeasure for a, r in pairs) / len(pairs)
    if "chrf" in names or "bleu" in names:
        import sacrebleu

        if "chrf" in names:
            out["chrf"] = sacrebleu.corpus_chrf(answers, [references]).score
        if "bleu" in names:
            out["bleu"] = sacrebleu.corpus_bleu(answers, [references]).score
    return out


def score(
    answers: list[str], references: list[str], names: list[str], labels: list[str]
) -> dict[str, Any]:
    """The metrics named (evaluate.metrics resolved) of answers against their references."""
    if not answers:
        raise ValueError("no answers to score")
    out: dict[str, Any] = text_scores(answers, references, [n for n in names if n in TEXT_METRICS])
    if any(n in LABEL_METRICS for n in names):
        scores = label_scores(answers, references, labels)
        out.update({k: v for k, v in scores.items() if k in names or k.startswith("unmatched")})
    return {**out, "examples": len(answers)}
