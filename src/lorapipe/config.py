"""Typed params: params.yaml is validated once, before any model or data loads.

A param's name here is its name in params.yaml and in dvc.yaml's `params:` lists.
Every error is one line that names the file and the field.
"""

from __future__ import annotations

import difflib
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from lorapipe.sections_model import (
    DataParams,
    LoraParams,
    ModelParams,
    QuantParams,
    Section,
    TokenizeParams,
)
from lorapipe.sections_run import (
    TRAINER_EVAL_KEYS,
    EvaluateParams,
    HubParams,
    MergeParams,
    TrainParams,
    best_model_metric,
)

# What every stage that loads the model reads: which model, for what task, on which tokens,
# quantized how. The stages' *_KEYS lists (and dvc.yaml's params) start from these; a section's
# name stands for every key in it (the stage reads them all).
MODEL_KEYS = ["task", "model", "data.num_labels", "tokenize"]
QUANT_KEYS = ["quant"]


class UserError(Exception):
    """A problem the user can fix (bad params, missing file, offline hub); printed as one line."""


class Params(Section):
    task: Literal["seq_cls", "causal_lm", "sft"] = Field(
        "seq_cls",
        description="What to learn: seq_cls labels a text, causal_lm continues text, "
        "sft answers prompts",
    )
    data: DataParams = Field(description="The examples: where they come from, which columns")
    model: ModelParams = Field(description="The pretrained base model the adapter trains on")
    tokenize: TokenizeParams = Field(
        TokenizeParams(), description="How text is cut into the tokens the model reads"
    )
    lora: LoraParams = Field(
        LoraParams(),
        description="The adapter: small trainable matrices A and B beside the frozen layers",
    )
    quant: QuantParams = Field(
        QuantParams(), description="The frozen base held in 4 or 8 bits (QLoRA) to save memory"
    )
    train: TrainParams = Field(
        TrainParams(), description="The training run: schedule, batches, precision, devices"
    )
    evaluate: EvaluateParams = Field(
        EvaluateParams(), description="The evaluate stage: base and tuned model on the eval rows"
    )
    merge: MergeParams = Field(
        MergeParams(),
        description="The merge stage: the adapter folded into the base, checked against the "
        "unmerged model",
    )
    hub: HubParams = Field(
        HubParams(),
        description="Uploads by `lorapipe push` (not a stage); the token comes from HF_TOKEN",
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if self.quant.bits != "none" and self.train.mixed_precision == "fp16":
            # bitsandbytes' k-bit layers with fp16 autocast overflow on long sequences.
            raise ValueError("train.mixed_precision: fp16 with a quantized base; use bf16 or auto")
        if self.data.format != "pair" and self.task != "sft":
            raise ValueError(f"data.format: {self.data.format} is for task: sft, not {self.task}")
        t = self.train
        stopping = t.early_stopping_patience is not None
        if stopping and t.eval_strategy == "no":
            raise ValueError(
                "train.early_stopping_patience: needs evals, but train.eval_strategy is no"
            )
        # Each eval's adapter is kept (Trainer loads the best back): a save at every eval.
        if stopping and t.eval_strategy == "steps" and t.save_steps != t.eval_steps:
            raise ValueError("train.save_steps: must equal train.eval_steps for early stopping")
        if best_model_metric(self.task, t.early_stopping_metric) is None:
            keys = ", ".join(TRAINER_EVAL_KEYS[self.task])
            raise ValueError(
                f"train.early_stopping_metric: {t.early_stopping_metric!r} is not in {self.task}'s "
                f"in-training eval (it logs {keys})"
            )
        if self.evaluate.perplexity == "sliding_window" and self.task != "causal_lm":
            raise ValueError(f"evaluate.perplexity: sliding_window is for causal_lm ({self.task})")
        if (self.evaluate.stride or 0) >= self.tokenize.max_length:
            # a window's first token has no context: the next window must score it
            raise ValueError("evaluate.stride: must be below the window, tokenize.max_length")
        _check_generation(self)
        return self


def _check_labels(key: str, labels: list[str]) -> None:
    from lorapipe.answers import label_form

    seen: dict[str, str] = {}
    for label in labels:
        if not label_form(label):
            raise ValueError(f"{key}: an empty label {label!r} (nothing left once normalised)")
        if label_form(label) in seen:
            raise ValueError(f"{key}: {seen[label_form(label)]!r} and {label!r} are one label")
        seen[label_form(label)] = label


def _check_generation(p: Params) -> None:
    from lorapipe.answers import LABEL_METRICS, METRICS

    e, d = p.evaluate, p.data
    _check_labels("data.label_names", d.label_names)
    if e.labels != "auto":
        _check_labels("evaluate.labels", e.labels)
    asked = [k for k in ("generate", "metrics", "labels") if getattr(e, k) not in ("auto", False)]
    if asked and p.task != "sft":
        raise ValueError(f"evaluate.{asked[0]}: answers are generated for task: sft, not {p.task}")
    unknown = [m for m in e.metric_names(d) if m not in METRICS]
    if unknown:
        raise ValueError(f"evaluate.metrics: unknown metric '{unknown[0]}' (known: {METRICS})")
    if any(m in LABEL_METRICS for m in e.metric_names(d)) and not e.label_set(d):
        raise ValueError("evaluate.metrics: accuracy and macro_f1 need evaluate.labels")
    if d.input_template is not None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(d.input_template) if f]
        except ValueError as exc:
            raise ValueError(f"data.input_template: {exc}") from None
        if not fields:
            raise ValueError("data.input_template: names no column, e.g. {sentence}")


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, prefix + name + ".")
    return keys


def _suggest(path: str) -> str | None:
    """The known key meant: a close spelling of a sibling, else the sibling the name contains
    (difflib alone misses `lora` for `lora_config`), else a close key anywhere."""
    known = _known_keys(Params)
    parent, _, name = path.rpartition(".")
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(path, siblings, n=1, cutoff=0.6)
    if close:
        return close[0]
    # Names of one letter (`r`) are in almost anything.
    hits = [k for k in siblings if len(short := k.rpartition(".")[2]) > 1 and short in name.lower()]
    if hits:
        return max(hits, key=len)
    close = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _describe(err: dict[str, Any], source: str) -> str:
    path = _field_path(err["loc"])
    if err["type"] == "extra_forbidden":
        meant = _suggest(path)
        hint = f" (did you mean '{meant}'?)" if meant else ""
        return f"{source}: {path}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{source}: {path}: required key is missing"
    got = err.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return f"{source}: {path}: {err['msg']}{shown}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; raise UserError with one line per invalid field."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if errors[0]["type"] == "value_error" and not errors[0]["loc"]:
            raise UserError(f"{source}: {errors[0]['msg'].removeprefix('Value error, ')}") from None
        raise UserError("\n".join(_describe(err, source) for err in errors)) from None


def _duplicate_keys(node: yaml.Node, path: str, source: str) -> list[str]:
    """PyYAML keeps the last of two equal keys silently; DVC's loader refuses them."""
    found = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            where = f"{path}.{name}" if path else str(name)
            line = key.start_mark.line + 1
            if name is not None and name in seen:
                found.append(
                    f"{source}: {where}: duplicate key (lines {seen[name]} and {line}); keep one"
                )
            elif name is not None:
                seen[name] = line
            found += _duplicate_keys(value, where, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found += _duplicate_keys(item, path, source)
    return found


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a YAML file")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            duplicates = _duplicate_keys(node, "", str(path)) if node is not None else []
            if duplicates:
                raise UserError("\n".join(duplicates))
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: malformed YAML: {problem}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({text_position(path, exc.start)})") from None


def text_position(path: Path, offset: int) -> str:
    """'line L, column C' (characters, from 1) of the byte offset where decoding failed."""
    head = path.read_bytes()[:offset]
    line_start = head.rfind(b"\n") + 1
    line = head.count(b"\n") + 1
    column = len(head[line_start:].decode("utf-8", errors="replace")) + 1
    return f"line {line}, column {column}"


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(read_yaml(path), str(path))


def stage_params(params: Params, keys: list[str]) -> dict[str, Any]:
    """The values of dotted keys, e.g. for fingerprinting exactly what a stage reads; a
    section's name (as dvc.yaml lists a section a stage reads whole) stands for its keys."""
    dumped = params.model_dump()
    out = {}
    for key in keys:
        if isinstance(getattr(params, key, None), Section):
            out |= {f"{key}.{name}": value for name, value in dumped[key].items()}
            continue
        value: Any = dumped
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out
