"""Each task's evaluation sums on known logits, and the chat-template prompt/response split."""

import math
from types import SimpleNamespace

import datasets
import pytest
import torch
import yaml
from transformers import AutoTokenizer, DataCollatorWithPadding

from lorapipe.config import UserError, parse_params
from lorapipe.evaluation import evaluate_model
from lorapipe.tasks import IGNORE, get_task
from tests.conftest import ROOT

# What the classifier says for a sentence, by its first word piece (its id after [CLS]).
LOGITS = {7: [2.0, 0.0, 0.0], 8: [0.0, 3.0, 1.0], 9: [0.5, 0.0, 1.5]}
ROWS = [(7, 0), (8, 1), (9, 2), (7, 1), (8, 2), (9, 2), (7, 0)]  # (first word, label)


class FirstTokenClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(16, 3)
        for token, logits in LOGITS.items():
            table[token] = torch.tensor(logits)
        self.table = torch.nn.Embedding.from_pretrained(table)
        self.batches: list[list[int]] = []  # the first words the model saw, batch by batch

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        self.batches.append(input_ids[:, 1].tolist())
        return SimpleNamespace(logits=self.table(input_ids[:, 1]))


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_seq_cls_accuracy_loss_and_confusion(tiny_bert, batch_size):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rows = datasets.Dataset.from_dict(
        {
            "input_ids": [[101, w, *([5] * i), 102] for i, (w, _) in enumerate(ROWS)],
            "labels": [label for _, label in ROWS],
        }
    )
    model = FirstTokenClassifier()
    got = evaluate_model(model, rows, DataCollatorWithPadding(tok), get_task("seq_cls"), batch_size)
    # In the stored order (the tokenize stage sorts eval by length), batch_size rows at a time.
    words = [w for w, _ in ROWS]
    assert model.batches == [words[i : i + batch_size] for i in range(0, 7, batch_size)]
    # Predictions: 7 -> 0, 8 -> 1, 9 -> 2; right on rows 0, 1, 2, 5, 6.
    losses = [-torch.log_softmax(torch.tensor(LOGITS[w]), -1)[label].item() for w, label in ROWS]
    assert got["accuracy"] == 5 / 7
    assert got["examples"] == 7
    assert math.isclose(got["loss"], sum(losses) / 7, rel_tol=1e-6)
    # confusion[label][prediction]
    assert got["confusion"] == [[2, 0, 0], [1, 1, 0], [0, 1, 2]]


def sft_params(**data):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["task"] = "sft"
    raw["data"].update(data)
    raw["tokenize"]["max_length"] = 64
    return parse_params(raw)


CHAT = (  # case-sensitive roles: the word-piece tokenizer lowercases what it reads
    "{% for m in messages %}{% if m['role'] == 'user' %}question{% elif m['role'] == "
    "'assistant' %}answer{% endif %}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}answer: {% endif %}"
)


@pytest.fixture
def chat_tok(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = CHAT
    return tok


def test_sft_chat_template_prompt_is_the_user_turn_and_loss_is_on_the_answer(chat_tok):
    p = sft_params(chat_template=True)
    rows = datasets.Dataset.from_dict({"input": ["what is two plus two"], "output": ["four"]})
    out = get_task("sft").tokenize(rows, chat_tok, p, "data.train")[0]
    prompt = chat_tok("question: what is two plus two answer: ", add_special_tokens=False)
    answer = chat_tok("four ", add_special_tokens=False)["input_ids"] + [chat_tok.eos_token_id]
    assert out["input_ids"] == prompt["input_ids"] + answer
    assert out["labels"] == [IGNORE] * len(prompt["input_ids"]) + answer


def test_sft_chat_template_that_does_not_extend_the_prompt_is_refused(chat_tok):
    chat_tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}[{{ 1 }}]"
    rows = datasets.Dataset.from_dict({"input": ["q"], "output": ["a"]})
    with pytest.raises(UserError, match=r"^data\.chat_template: the template does not extend"):
        get_task("sft").tokenize(rows, chat_tok, sft_params(chat_template=True), "data.train")


def test_seq_cls_evaluation_drops_the_length_column(tiny_bert):
    """The tokenize stage stores `length`; no model takes it as an input."""
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rows = datasets.Dataset.from_dict(
        {"input_ids": [[101, 7, 102], [101, 8, 5, 102]], "labels": [0, 1], "length": [3, 4]}
    )
    got = evaluate_model(
        FirstTokenClassifier(), rows, DataCollatorWithPadding(tok), get_task("seq_cls"), 2
    )
    assert (got["accuracy"], got["examples"]) == (1.0, 2)


class DeviceRecorder(torch.nn.Module):
    """Weights on the meta device, as a GPU model's are on cuda: records where inputs arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.seen: list[str] = []

    def forward(self, **inputs):
        self.seen += [v.device.type for v in inputs.values() if torch.is_tensor(v)]
        return SimpleNamespace(logits=None)


class DevicesTask:
    def score_batch(self, logits, batch):
        return {"devices": [v.device.type for v in batch.values()]}

    def summarize(self, sums):
        return sums


def test_every_batch_goes_to_the_models_device_under_a_bar_in_a_terminal(
    tiny_bert, monkeypatch, capsys
):
    monkeypatch.setenv("LORAPIPE_PROGRESS", "bars")  # as in a terminal
    rows = datasets.Dataset.from_dict({"input_ids": [[101, 7, 102]] * 3, "labels": [0, 1, 0]})
    model = DeviceRecorder()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    got = evaluate_model(model, rows, DataCollatorWithPadding(tok), DevicesTask(), 2)
    assert len(model.seen) == 4 and set(model.seen) == {"meta"}  # 2 batches x ids and mask
    assert len(got["devices"]) == 6 and set(got["devices"]) == {"meta"}  # labels too
    bar = capsys.readouterr().err
    assert "evaluate:" in bar and "batch/s" in bar and "0/2 " in bar  # 2 batches


@pytest.fixture
def plain_tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.mark.parametrize(
    ("missing", "key"), [("input", "data.input_field"), ("output", "data.output_field")]
)
def test_sft_missing_column_names_the_key(plain_tok, missing, key):
    rows = datasets.Dataset.from_dict({"input": ["q"], "output": ["a"]}).remove_columns(missing)
    with pytest.raises(UserError) as info:
        get_task("sft").tokenize(rows, plain_tok, sft_params(), "data.eval")
    assert str(info.value).startswith(f"data.eval: no '{missing}' column (set {key}; columns: ")


@pytest.mark.parametrize("column", ["input", "output"])
def test_sft_row_that_is_not_text_names_the_row(plain_tok, column):
    data = {"input": ["q", "q2"], "output": ["a", "a2"]}
    data[column] = ["fine", None]
    rows = datasets.Dataset.from_dict(data)
    with pytest.raises(UserError, match=rf"^data\.train: row 2: '{column}' is None, not text$"):
        get_task("sft").tokenize(rows, plain_tok, sft_params(), "data.train")


def test_sft_skips_prompts_with_no_room_for_an_answer_and_keeps_the_rest(plain_tok):
    p = sft_params()
    sep = p.data.separator
    long = "word " * 200  # far over max_length 64
    exact = ""  # a prompt of exactly max_length tokens: room for no answer token either
    while len(plain_tok(exact + sep, add_special_tokens=False)["input_ids"]) < 64:
        exact += "a "
    assert len(plain_tok(exact + sep, add_special_tokens=False)["input_ids"]) == 64
    rows = datasets.Dataset.from_dict(
        {"input": [long, exact, "what is two plus two"], "output": ["x", "y", "four"]}
    )
    out = get_task("sft").tokenize(rows, plain_tok, p, "data.train")
    assert len(out) == 1
    prompt = plain_tok("what is two plus two" + sep, add_special_tokens=False)["input_ids"]
    assert out[0]["input_ids"][: len(prompt)] == prompt


def test_sft_with_every_prompt_too_long_says_so(plain_tok):
    rows = datasets.Dataset.from_dict({"input": ["word " * 200], "output": ["x"]})
    with pytest.raises(UserError) as info:
        get_task("sft").tokenize(rows, plain_tok, sft_params(), "data.train")
    assert str(info.value) == ("data.train: every prompt is longer than tokenize.max_length=64")


def cls_params(**tokenize):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tokenize"].update(tokenize)
    return parse_params(raw)


def test_seq_cls_rows_are_cut_to_max_length(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    p = cls_params(max_length=8)
    rows = datasets.Dataset.from_dict({"sentence": ["word " * 50, "ok"], "label": [0, 1]})
    out = get_task("seq_cls").tokenize(rows, tok, p, "data.train")
    assert out["length"][:] == [8, 3]
    assert out["input_ids"][0][-1] == tok.sep_token_id  # cut, and still closed by [SEP]


def test_seq_cls_errors_name_the_split_the_key_and_the_row(tiny_bert):
    tok, task, p = AutoTokenizer.from_pretrained(tiny_bert), get_task("seq_cls"), cls_params()
    no_label = datasets.Dataset.from_dict({"sentence": ["a"]})
    with pytest.raises(UserError) as info:
        task.tokenize(no_label, tok, p, "data.eval")
    assert str(info.value) == (
        "data.eval: no 'label' column (set data.label_field; columns: ['sentence'])"
    )
    no_text = datasets.Dataset.from_dict({"label": [1]})
    with pytest.raises(UserError) as info:
        task.tokenize(no_text, tok, p, "data.eval")
    assert (
        str(info.value)
        == "data.eval: no 'sentence' column (set data.text_field; columns: ['label'])"
    )
    not_text = datasets.Dataset.from_dict({"sentence": ["a", "b", None], "label": [0, 1, 1]})
    with pytest.raises(UserError) as info:
        task.tokenize(not_text, tok, p, "data.eval")
    assert str(info.value) == "data.eval: row 3: 'sentence' is None, not text"
