"""Prompt/response and chat data as users have it → token ids with labels on the answers only.

`data.format`: `pair` (input/output columns), `alpaca` (instruction / optional input / output),
`messages` (OpenAI-style `[{"role", "content"}, ...]`, multi-turn, optional system turn) and
`sharegpt` (`conversations` of `{"from", "value"}`). Conversations go through the tokenizer's
chat template; every token outside an assistant turn is labelled IGNORE.
"""

from __future__ import annotations

import string
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from lorapipe.config import UserError
from lorapipe.data_sources import at
from lorapipe.packing import IGNORE
from lorapipe.sections_model import DataParams

CONVERSATION_COLUMN = {"messages": "messages", "sharegpt": "conversations"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
ROLES = ("system", "user", "assistant")


def _column(rows: datasets.Dataset, column: str, where: str, what: str) -> list[Any]:
    if column not in rows.column_names:
        raise UserError(f"{where}: no '{column}' column ({what}; columns: {rows.column_names})")
    return rows[column][:]


def _text(value: Any, where: str, row: str, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {row}: '{name}' is {value!r}, not text")
    return value


def _inputs(rows: datasets.Dataset, d: DataParams, where: str) -> list[Any]:
    """The prompt column, or data.input_template filled from each row's columns."""
    if d.input_template is None:
        return _column(rows, d.input_field, where, "set data.input_field")
    fields = {f for _, f, _, _ in string.Formatter().parse(d.input_template) if f}
    for field in sorted(fields):
        _column(rows, field, where, "named by data.input_template")
    return [d.input_template.format(**row) for row in rows]


def _label_name(value: Any, d: DataParams, where: str, row: str) -> str:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value < len(d.label_names):
        raise UserError(
            f"{where}: {row}: '{d.output_field}' is {value!r}, not an index of data.label_names "
            f"(0..{len(d.label_names) - 1})"
        )
    return d.label_names[value]


def pairs(rows: datasets.Dataset, d: DataParams, where: str) -> list[tuple[str, str]]:
    """(prompt, response) per row of a `pair` or `alpaca` set."""
    if d.format == "pair":
        inputs = _inputs(rows, d, where)
        outputs = _column(rows, d.output_field, where, "set data.output_field")
        if d.label_names:
            outputs = [_label_name(o, d, where, at(rows, n)) for n, o in enumerate(outputs)]
        names = (d.input_template or d.input_field, d.output_field)
        return [
            (_text(i, where, at(rows, n), names[0]), _text(o, where, at(rows, n), names[1]))
            for n, (i, o) in enumerate(zip(inputs, outputs, strict=True))
        ]
    what = "data.format: alpaca"
    instructions = _column(rows, "instruction", where, what)
    outputs = _column(rows, "output", where, what)
    inputs = rows["input"][:] if "input" in rows.column_names else [""] * len(rows)
    out = []
    for n, (ins, inp, res) in enumerate(zip(instructions, inputs, outputs, strict=True)):
        row = at(rows, n)
        ins, res = _text(ins, where, row, "instruction"), _text(res, where, row, "output")
        inp = _text(inp or "", where, row, "input")  # null or empty: an instruction on its own
        out.append((f"{ins}\n\n{inp}" if inp.strip() else ins, res))
    return out


def conversations(rows: datasets.Dataset, d: DataParams, where: str) -> list[list[dict]]:
    """Validated [{"role", "content"}, ...] per row of a `messages` or `sharegpt` set."""
    column = CONVERSATION_COLUMN[d.format]
    role_key, text_key = ("role", "content") if d.format == "messages" else ("from", "value")
    out = []
    for i, turns in enumerate(_column(rows, column, where, f"data.format: {d.format}")):
        n = at(rows, i)
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{where}: {n}: '{column}' is {turns!r}, not a list of turns")
        messages = []
        for t, turn in enumerate(turns, 1):
            if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
                raise UserError(
                    f"{where}: {n}: turn {t} is not a {{'{role_key}', '{text_key}'}} mapping"
                )
            role = turn[role_key]
            role = SHAREGPT_ROLES.get(role, role) if d.format == "sharegpt" else role
            if role not in ROLES:
                raise UserError(
                    f"{where}: {n}: turn {t}: role {turn[role_key]!r} is not one of "
                    f"{', '.join(ROLES if d.format == 'messages' else SHAREGPT_ROLES)}"
                )
            messages.append({"role": role, "content": _text(turn[text_key], where, n, text_key)})
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: {n}: no assistant turn: nothing to learn")
        out.append(messages)
    return out


def uses_template(d: DataParams) -> bool:
    return d.chat_template or d.format in CONVERSATION_COLUMN


def require_template(tok: PreTrainedTokenizerBase, d: DataParams) -> None:
    if uses_template(d) and not tok.chat_template:
        key = "data.chat_template" if d.format in ("pair", "alpaca") else "data.format"
        raise UserError(f"{key}: the tokenizer of model.name has no chat template")
    if uses_template(d) and not tok.is_fast:
        raise UserError("data.format: chat data needs a fast tokenizer (character offsets)")


def prompt_text(tok: PreTrainedTokenizerBase, d: DataParams, message: str) -> str:
    """What the model sees before its answer to `message`: in training, and in `generate`."""
    if uses_template(d):
        user = [{"role": "user", "content": message}]
        return tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    return message + d.separator


def conversation_ids(
    tok: PreTrainedTokenizerBase, messages: list[dict], where: str, row: int, key: str
) -> tuple[list[int], list[int]]:
    """The template-rendered conversation; labels on each assistant turn and its end-of-turn.

    Each assistant turn's text is what rendering it adds after the generation prompt, so the
    template must extend turn by turn (checked; `key` names the param in the error);
    whitespace the template puts after the end-of-turn token stays context. Tokenized once,
    whole: the ids are what the model is given at inference; character offsets say which
    tokens fall in an assistant turn.
    """

    def render(turns: list[dict], generation_prompt: bool) -> str:
        return tok.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt
        )

    def broken(turn: int) -> UserError:
        return UserError(
            f"{key}: the template does not extend turn by turn ({where} row {row}, turn {turn}: "
            "it rewrites earlier text), so the assistant tokens cannot be told apart"
        )

    spans, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise broken(i + 1)
        spans.append((len(prompt), len(full.rstrip())))
        done = full
    text = render(messages, False)
    if not text.startswith(done):
        raise broken(len(messages))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        tid if any(start < b and end > a for a, b in spans) else IGNORE  # overlaps a turn
        for tid, (start, end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    ends_with_answer = messages[-1]["role"] == "assistant"
    if ends_with_answer and [t for t in labels if t != IGNORE][-1:] != [tok.eos_token_id]:
        # A template with no end-of-turn token of its own: EOS teaches the model to stop.
        ids, labels = [*ids, tok.eos_token_id], [*labels, tok.eos_token_id]
    return ids, labels


def encode(
    rows: datasets.Dataset, tok: PreTrainedTokenizerBase, d: DataParams, where: str
) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per row, untruncated; prompt tokens labelled IGNORE."""
    require_template(tok, d)
    if d.format in CONVERSATION_COLUMN:
        convs = conversations(rows, d, where)
    elif uses_template(d):
        convs = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in pairs(rows, d, where)
        ]
    else:
        out = []
        for prompt, response in pairs(rows, d, where):
            p_ids = tok(prompt + d.separator, add_special_tokens=False)["input_ids"]
            r_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out.append((p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids))
        return out
    key = "data.format" if d.format in CONVERSATION_COLUMN else "data.chat_template"
    return [conversation_ids(tok, c, where, n, key) for n, c in enumerate(convs, 1)]


def stop_ids(tok: PreTrainedTokenizerBase, d: DataParams) -> list[int]:
    """The tokens that end an answer: EOS, and the end-of-turn token the template trains on."""
    ids = {tok.eos_token_id}
    if uses_template(d):
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        _, labels = conversation_ids(tok, probe, "the chat template", 1, "data.chat_template")
        ids.add([t for t in labels if t != IGNORE][-1])
    return sorted(i for i in ids if i is not None)
