"""Causal LM rows: the pack layout's exact blocks, the collator's padding per layout, errors."""

import datasets
import pytest
import yaml
from transformers import AutoTokenizer

from lorapipe.config import UserError, parse_params
from lorapipe.tasks import IGNORE, get_task
from tests.conftest import ROOT

SIZE = 16


def params(task="causal_lm", **tokenize):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["task"] = task
    raw["data"]["text_field"] = "text"
    raw["tokenize"].update({"max_length": SIZE, **tokenize})
    return parse_params(raw)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def stream_of(tok, docs):
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    return [t for x in ids for t in [*x, tok.eos_token_id]]


def test_pack_of_exactly_whole_blocks_keeps_the_last(tok):
    docs = ["one two three four five six seven"]
    while len(stream_of(tok, docs)) % SIZE:
        docs[0] += " x"
    stream = stream_of(tok, docs)
    rows = datasets.Dataset.from_dict({"text": docs})
    out = get_task("causal_lm").tokenize(rows, tok, params(), "data.train")
    assert [t for row in out["input_ids"] for t in row] == stream


def test_pad_layout_rows_are_the_lines_cut_to_fit_their_eos(tok):
    lines = ["short line", "a much longer line " * 10]
    rows = datasets.Dataset.from_dict({"text": lines})
    out = get_task("causal_lm").tokenize(rows, tok, params(layout="pad"), "data.train")
    ids = tok(lines, add_special_tokens=False)["input_ids"]
    expected = [[*ids[0], tok.eos_token_id], [*ids[1][: SIZE - 1], tok.eos_token_id]]
    assert out["input_ids"][:] == expected
    assert out["attention_mask"][:] == [[1] * len(x) for x in expected]


def test_the_sliding_window_stream_is_every_non_blank_document_in_order(tok):
    lines = ["first doc", "  ", "second, longer document"]
    rows = datasets.Dataset.from_dict({"text": lines})
    out = get_task("causal_lm").stream(rows, tok, params(), "data.eval")
    ids = tok([lines[0], lines[2]], add_special_tokens=False)["input_ids"]
    assert out.column_names == ["input_ids"]
    assert out["input_ids"][:] == [[*x, tok.eos_token_id] for x in ids]
    blank = datasets.Dataset.from_dict({"text": [" "]})
    with pytest.raises(UserError, match=r"^data\.eval: no non-empty text in 'text'$"):
        get_task("causal_lm").stream(blank, tok, params(), "data.eval")


@pytest.mark.parametrize(
    ("task", "layout", "width"),
    # (the packed layout's collator: tests/test_packing.py)
    [("causal_lm", "pad", SIZE), ("sft", "pad", 5)],
)
def test_collator_pads_to_max_length_only_for_the_pad_layout(tok, task, layout, width):
    """`pad` imitates the hand-written scripts (every row max_length); the others pad per batch."""
    p = params(task, layout=layout)
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1] * 3, "labels": [5, 6, 7]}]
    rows.append(
        {"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "labels": [IGNORE, 6, 7, 8, 9]}
    )
    batch = get_task(task).collator(tok, p)(rows)
    assert batch["input_ids"].shape == (2, width)
    assert batch["labels"][0].tolist() == [5, 6, 7] + [IGNORE] * (width - 3)
    assert batch["attention_mask"][0].tolist() == [1] * 3 + [0] * (width - 3)


def test_errors_name_the_split_the_row_and_the_key(tok):
    task = get_task("causal_lm")
    no_column = datasets.Dataset.from_dict({"body": ["x"]})
    with pytest.raises(UserError) as info:
        task.tokenize(no_column, tok, params(), "data.eval")
    assert str(info.value) == "data.eval: no 'text' column (set data.text_field; columns: ['body'])"
    not_text = datasets.Dataset.from_dict({"text": ["fine", None]})
    with pytest.raises(UserError) as info:
        task.tokenize(not_text, tok, params(), "data.eval")
    assert str(info.value) == "data.eval: row 2: 'text' is None, not text"
    blank = datasets.Dataset.from_dict({"text": ["", "  \n"]})
    with pytest.raises(UserError) as info:
        task.tokenize(blank, tok, params(), "data.train")
    assert str(info.value) == "data.train: no non-empty text in 'text'"
