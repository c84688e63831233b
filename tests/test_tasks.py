"""The tasks' rows: seq_cls labels, sft prompt/response labels; causal LM rows (the pack
layout's exact blocks, the collator's padding per layout, errors)."""

from itertools import chain

import datasets
import pytest
import yaml
from transformers import AutoTokenizer

from lorapipe.config import UserError, parse_params
from lorapipe.tasks import IGNORE, get_task
from tests.conftest import ROOT


def params(**sections):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return parse_params(raw)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_seq_cls_no_padding_and_labels(tok):
    rows = datasets.Dataset.from_dict(
        {"sentence": ["good", "a very bad film"], "label": ["1", "0"]}
    )
    out = get_task("seq_cls").tokenize(rows, tok, params(), "data.train")
    assert out["labels"][:] == [1, 0]
    assert [len(x) for x in out["input_ids"]] == out["length"][:]
    assert len(out["input_ids"][0]) < len(out["input_ids"][1])  # not padded at this stage


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["1", "pos"], "row 2: label 'pos' is not an integer"),
        (["1", "2"], r"row 2: label 2 is outside 0..1 \(data.num_labels\)"),
        (["1", "0.5"], "row 2: label '0.5' is not an integer"),
    ],
)
def test_seq_cls_bad_labels(tok, labels, message):
    rows = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": labels})
    with pytest.raises(UserError, match=message):
        get_task("seq_cls").tokenize(rows, tok, params(), "data.train")


def test_missing_text_column_lists_columns(tok):
    rows = datasets.Dataset.from_dict({"text": ["a"], "label": ["1"]})
    with pytest.raises(UserError, match=r"no 'sentence' column \(set data.text_field"):
        get_task("seq_cls").tokenize(rows, tok, params(), "data.train")


def test_pack_keeps_documents_whole_with_restarting_positions(tok):
    rows = datasets.Dataset.from_dict({"text": ["hello world " * 20, "", "second doc", "third"]})
    p = params(data__text_field="text", tokenize__max_length=16)
    out = get_task("causal_lm").tokenize(rows, tok, p, "data.train")
    assert "attention_mask" not in out.column_names  # packed: position_ids make the mask
    docs = []
    for ids, labels, positions in zip(
        out["input_ids"], out["labels"], out["position_ids"], strict=True
    ):
        assert len(ids) <= 16
        starts = [i for i, pos in enumerate(positions) if pos == 0]
        for a, b in zip(starts, [*starts[1:], len(ids)], strict=True):
            assert positions[a:b] == list(range(b - a))
            assert labels[a:b] == [IGNORE, *ids[a + 1 : b]]
            docs.append(ids[a:b])
    first = tok("hello world " * 20, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # the long text in pieces of at most 16 tokens, the short ones whole, each ending in EOS
    assert sorted(docs) == sorted(
        [first[i : i + 16] for i in range(0, len(first), 16)]
        + [
            tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for t in ("second doc", "third")
        ]
    )


def test_sft_pack_packs_pairs_without_padding(tok):
    rows = datasets.Dataset.from_dict({"input": ["one", "two", "three"], "output": ["a", "b", "c"]})
    p = params(tokenize__max_length=64)
    packed = get_task("sft").tokenize(rows, tok, p, "data.train")
    pad = params(tokenize__max_length=64, tokenize__layout="pad")
    rows_out = get_task("sft").tokenize(rows, tok, pad, "data.train")
    assert len(packed) == 1 and len(rows_out) == 3
    assert packed[0]["input_ids"] == list(chain(*rows_out["input_ids"]))
    assert packed[0]["labels"] == list(chain(*rows_out["labels"]))  # prompts -100, responses kept
    assert packed[0]["position_ids"] == [i for n in rows_out["length"] for i in range(n)]


def test_pad_layout_one_row_per_nonblank_line(tok):
    rows = datasets.Dataset.from_dict({"text": ["short", "", "   ", "a longer line " * 40]})
    p = params(data__text_field="text", tokenize__max_length=16, tokenize__layout="pad")
    out = get_task("causal_lm").tokenize(rows, tok, p, "data.train")
    assert len(out) == 2 and max(out["length"]) == 16
    assert all(row[-1] == tok.eos_token_id for row in out["input_ids"])


def test_sft_loss_only_on_the_response(tok):
    rows = datasets.Dataset.from_dict({"input": ["what is two plus two"], "output": ["four"]})
    p = params(tokenize__max_length=64)
    out = get_task("sft").tokenize(rows, tok, p, "data.train")[0]
    prompt = tok("what is two plus two" + p.data.separator, add_special_tokens=False)["input_ids"]
    response = tok("four", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out["input_ids"] == prompt + response
    assert out["labels"] == [IGNORE] * len(prompt) + response


SIZE = 16


def causal(task="causal_lm", **tokenize):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["task"] = task
    raw["data"]["text_field"] = "text"
    raw["tokenize"].update({"max_length": SIZE, **tokenize})
    return parse_params(raw)


def stream_of(tok, docs):
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    return [t for x in ids for t in [*x, tok.eos_token_id]]


def test_pack_of_exactly_whole_blocks_keeps_the_last(tok):
    docs = ["one two three four five six seven"]
    while len(stream_of(tok, docs)) % SIZE:
        docs[0] += " x"
    stream = stream_of(tok, docs)
    rows = datasets.Dataset.from_dict({"text": docs})
    out = get_task("causal_lm").tokenize(rows, tok, causal(), "data.train")
    assert [t for row in out["input_ids"] for t in row] == stream


def test_pad_layout_rows_are_the_lines_cut_to_fit_their_eos(tok):
    lines = ["short line", "a much longer line " * 10]
    rows = datasets.Dataset.from_dict({"text": lines})
    out = get_task("causal_lm").tokenize(rows, tok, causal(layout="pad"), "data.train")
    ids = tok(lines, add_special_tokens=False)["input_ids"]
    expected = [[*ids[0], tok.eos_token_id], [*ids[1][: SIZE - 1], tok.eos_token_id]]
    assert out["input_ids"][:] == expected
    assert out["attention_mask"][:] == [[1] * len(x) for x in expected]


def test_the_sliding_window_stream_is_every_non_blank_document_in_order(tok):
    lines = ["first doc", "  ", "second, longer document"]
    rows = datasets.Dataset.from_dict({"text": lines})
    out = get_task("causal_lm").stream(rows, tok, causal(), "data.eval")
    ids = tok([lines[0], lines[2]], add_special_tokens=False)["input_ids"]
    assert out.column_names == ["input_ids"]
    assert out["input_ids"][:] == [[*x, tok.eos_token_id] for x in ids]
    blank = datasets.Dataset.from_dict({"text": [" "]})
    with pytest.raises(UserError, match=r"^data\.eval: no non-empty text in 'text'$"):
        get_task("causal_lm").stream(blank, tok, causal(), "data.eval")


@pytest.mark.parametrize(
    ("task", "layout", "width"),
    # (the packed layout's collator: tests/test_packing.py)
    [("causal_lm", "pad", SIZE), ("sft", "pad", 5)],
)
def test_collator_pads_to_max_length_only_for_the_pad_layout(tok, task, layout, width):
    """`pad` imitates the hand-written scripts (every row max_length); the others pad per batch."""
    p = causal(task, layout=layout)
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
        task.tokenize(no_column, tok, causal(), "data.eval")
    assert str(info.value) == "data.eval: no 'text' column (set data.text_field; columns: ['body'])"
    not_text = datasets.Dataset.from_dict({"text": ["fine", None]})
    with pytest.raises(UserError) as info:
        task.tokenize(not_text, tok, causal(), "data.eval")
    assert str(info.value) == "data.eval: row 2: 'text' is None, not text"
    blank = datasets.Dataset.from_dict({"text": ["", "  \n"]})
    with pytest.raises(UserError) as info:
        task.tokenize(blank, tok, causal(), "data.train")
    assert str(info.value) == "data.train: no non-empty text in 'text'"
