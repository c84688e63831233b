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


def test_pack_makes_full_blocks_joined_by_eos(tok):
    rows = datasets.Dataset.from_dict({"text": ["hello world " * 20, "", "second doc " * 30]})
    p = params(data__text_field="text", tokenize__max_length=16)
    out = get_task("causal_lm").tokenize(rows, tok, p, "data.train")
    assert set(out["length"]) == {16}
    assert out["labels"][:] == out["input_ids"][:]
    flat = [t for row in out["input_ids"] for t in row]
    assert tok.eos_token_id in flat


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
