"""Typed params: params.yaml is validated once, before any model or data loads.

A param's name here is its name in params.yaml and in dvc.yaml's `params:` lists.
Every error is one line that names the file and the field.
"""

from __future__ import annotations

import difflib
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

# What every stage that loads the model reads: which model, for what task, on which tokens,
# quantized how. The stages' *_KEYS lists (and dvc.yaml's params) start from these.
MODEL_KEYS = [
    "task",
    "model.name",
    "model.trust_remote_code",
    "data.num_labels",
    "tokenize.max_length",
    "tokenize.layout",
]
QUANT_KEYS = ["quant.bits", "quant.quant_type", "quant.double_quant", "quant.compute_dtype"]


ALL_LINEAR = "all-linear"


def _only(*tasks: str) -> dict[str, Any]:
    """json_schema_extra of a key only these tasks read (params.yaml marks it)."""
    return {"tasks": list(tasks)}


class UserError(Exception):
    """A problem the user can fix (bad params, missing file, offline hub); printed as one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    train: str = Field(
        description="Training rows: a .tsv/.csv/.jsonl/.txt file, hf:<id>[:<config>]:<split> "
        "(hub), pydoc:topics or pydoc:qa"
    )
    eval: str | None = Field(
        None, description="Eval rows, in the same forms; null: hold out eval_fraction of train"
    )
    eval_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of the training rows held out for eval when data.eval is null",
    )
    text_field: str = Field(
        "sentence",
        description="Column holding the text",
        json_schema_extra=_only("seq_cls", "causal_lm"),
    )
    label_field: str = Field(
        "label",
        description="Column holding each row's class, an integer from 0",
        json_schema_extra=_only("seq_cls"),
    )
    num_labels: int = Field(
        2,
        ge=2,
        description="Number of classes; labels run from 0 to num_labels - 1",
        json_schema_extra=_only("seq_cls"),
    )
    format: Literal["pair", "messages", "alpaca", "sharegpt"] = Field(
        "pair",
        description="Row layout: pair (a prompt and a response column), messages (chat turns), "
        "alpaca, or sharegpt",
        json_schema_extra=_only("sft"),
    )
    input_field: str = Field(
        "input",
        description="Column holding the prompt (format: pair)",
        json_schema_extra=_only("sft"),
    )
    output_field: str = Field(
        "output",
        description="Column holding the response the model learns to write (format: pair)",
        json_schema_extra=_only("sft"),
    )
    separator: str = Field(
        "\n### Response:\n",
        description="Text put between prompt and response when no chat template is used",
        json_schema_extra=_only("sft"),
    )
    input_template: str | None = Field(
        None,
        description="Builds each prompt from a row's columns, e.g. 'Review: {sentence}'; "
        "null: the input_field column",
        json_schema_extra=_only("sft"),
    )
    label_names: list[str] = Field(
        default_factory=list,
        description="Words for an integer output_field, the first for 0, e.g. [negative, positive]",
        json_schema_extra=_only("sft"),
    )
    chat_template: bool = Field(
        False,
        description="Wrap prompt and response in the tokenizer's chat template, not the separator",
        json_schema_extra=_only("sft"),
    )
    max_train_rows: int | None = Field(
        None, gt=0, description="Use only the first this-many training rows; null: all of them"
    )
    max_eval_rows: int | None = Field(
        None, gt=0, description="Use only the first this-many eval rows; null: all of them"
    )


class ModelParams(_Section):
    name: str = Field(
        description="Base model: a hub id, a local folder, a .gguf file, or "
        "pkg:<distribution>/<path> (from a package)"
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a hub model; only if you trust its author"
    )


class TokenizeParams(_Section):
    max_length: int = Field(
        128, gt=0, description="Most tokens per example (per block when packed); longer text is cut"
    )
    layout: Literal["pack", "pad"] = Field(
        "pack",
        description="pack: whole documents packed into full blocks, none seeing another; "
        "pad: one example per row, padded",
        json_schema_extra=_only("causal_lm", "sft"),
    )


def _all_linear(value: Any) -> Any:
    return [value] if value == ALL_LINEAR else value


class LoraParams(_Section):
    r: int = Field(
        8,
        gt=0,
        description="Rank: the inner size of A and B; larger learns more, costs more memory",
    )
    alpha: float = Field(
        16,
        gt=0,
        description="Strength of the adapter's update: scaled by alpha / r "
        "(alpha / sqrt(r) with use_rslora)",
    )
    dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of the adapter's inputs zeroed at random while training (against "
        "overfitting)",
    )
    # `all-linear` (PEFT: every linear layer but the output head) is held as ["all-linear"].
    target_modules: Annotated[list[str], BeforeValidator(_all_linear)] = Field(
        default_factory=lambda: ["query", "value"],
        min_length=1,
        description="Layers that get an adapter, by short name (e.g. [query, value]); "
        "all-linear: all but the output head",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none",
        description="Which bias vectors train too: none, all, or those of adapted layers "
        "(lora_only)",
    )
    use_dora: bool = Field(
        False, description="DoRA: also train a magnitude vector for each adapted layer"
    )
    use_rslora: bool = Field(
        False, description="rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r"
    )
    init: Literal[True, "kaiming", "gaussian", "pissa", "olora", "loftq"] = Field(
        "kaiming",
        description="Start: kaiming or true (A random Kaiming-uniform, B zero: the LoRA paper's), "
        "gaussian, pissa/olora (unquantized base)",
    )
    plus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: B learns this many times faster than A (e.g. 16); null: both alike",
    )
    # PEFT's per-layer overrides: a key is a layer name or regex (`layer.0.attention.self.query`,
    # `value`), matched against the end of each targeted layer's full name.
    rank_pattern: dict[str, Annotated[int, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Per-layer rank, e.g. {query: 16}; a key matches the end of a layer's name",
    )
    alpha_pattern: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Per-layer alpha, keyed as rank_pattern"
    )


class QuantParams(_Section):
    bits: Literal[4, 8, "none"] = Field(
        "none", description="Bits per frozen base weight: 4, 8, or none (full precision)"
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit number format: nf4 (spaced for trained weights) or fp4"
    )
    double_quant: bool = Field(
        True, description="4-bit: also compress the scaling constants (about 0.4 bits per weight)"
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Arithmetic precision over a 4/8-bit base; auto: bfloat16 on a GPU that has "
        "it, else float32",
    )


class TrainParams(_Section):
    seed: int = Field(
        42, description="Seed of the init, data order, eval split and sampling: same seed, same run"
    )
    epochs: float = Field(
        3, gt=0, description="Passes over the training rows (1.5: one and a half)"
    )
    max_steps: int = Field(
        -1, ge=-1, description="Stop after this many optimizer steps; -1: run all epochs"
    )
    batch_size: int = Field(32, gt=0, description="Examples per process per step")
    grad_accum: int = Field(
        1,
        gt=0,
        description="Steps whose gradients add up before one update "
        "(the batch grows grad_accum times)",
    )
    learning_rate: float = Field(
        5e-4,
        gt=0,
        description="Peak learning rate, reached after warmup, then falling linearly to 0",
    )
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay: pulls trained weights a little toward 0"
    )
    warmup_ratio: float = Field(
        0.06, ge=0, lt=1, description="Share of the steps over which the learning rate rises from 0"
    )
    max_grad_norm: float = Field(
        1.0, gt=0, description="Gradients are scaled down when their overall size exceeds this"
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="16-bit arithmetic in training; auto: bf16 where it runs fast, else fp16 on a "
        "GPU (not with a 4/8-bit base)",
    )
    sampling: Literal["group_by_length", "random", "sequential"] = Field(
        "group_by_length",
        description="Batch order: group_by_length (similar lengths together, little padding), "
        "random, or sequential",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, slower steps"
    )
    logging_steps: int = Field(10, gt=0, description="Log loss and learning rate every N steps")
    eval_strategy: Literal["epoch", "steps", "no"] = Field(
        "epoch", description="When to evaluate while training: each epoch, every eval_steps, or no"
    )
    eval_steps: int = Field(100, gt=0, description="Steps between evals when eval_strategy: steps")
    save_steps: int = Field(
        100, gt=0, description="Steps between checkpoints, which a stopped run resumes from"
    )
    early_stopping_patience: int | None = Field(
        None,
        gt=0,
        description="Stop after this many evals without improvement, keeping the best adapter; "
        "null: off",
    )
    early_stopping_metric: str = Field(
        "auto",
        description="What early stopping watches: eval_loss or eval_accuracy; auto: accuracy for "
        "seq_cls, loss otherwise",
    )
    num_processes: Literal["auto"] | Annotated[int, Field(gt=0)] = Field(
        "auto",
        description="Training processes, one per GPU; auto: every visible GPU (1 on a CPU); "
        ">1 runs accelerate launch",
    )
    # DDP only: LoRA's trainable state is tiny, so sharding it (ZeRO, FSDP) saves nothing; FSDP
    # and DeepSpeed were removed because neither could be verified here (README, Several devices).
    distributed: Literal["ddp", "multinode-ddp"] = Field(
        "ddp",
        description="Several processes: ddp (one machine) or multinode-ddp (several machines; "
        "configs/accelerate/)",
    )
    compile: bool = Field(
        False, description="torch.compile the model: faster steps after a slower start"
    )
    liger: bool = Field(
        False, description="Liger's fused Triton kernels (needs a CUDA GPU and liger-kernel)"
    )
    deterministic: bool = Field(
        False,
        description="Deterministic algorithms: a rerun gives the same adapter bytes, some speed "
        "lost",
    )


# What each task's in-training eval logs (Trainer's eval_loss, seq_cls's accuracy), the task's
# own metric first: early_stopping_metric's auto. Perplexity, exp(loss), ranks as eval_loss.
TRAINER_EVAL_KEYS = {
    "seq_cls": ("eval_accuracy", "eval_loss"),
    "causal_lm": ("eval_loss",),
    "sft": ("eval_loss",),
}


def best_model_metric(task: str, metric: str) -> str | None:
    """train.early_stopping_metric as a Trainer eval key; None if the task's eval lacks it."""
    name = TRAINER_EVAL_KEYS[task][0] if metric == "auto" else metric
    key = "eval_" + name.removeprefix("eval_")
    key = "eval_loss" if key == "eval_perplexity" else key
    return key if key in TRAINER_EVAL_KEYS[task] else None


class EvaluateParams(_Section):
    batch_size: int = Field(
        64, gt=0, description="Eval examples per batch (lowered if a batch's outputs would not fit)"
    )
    num_samples: int = Field(
        3,
        ge=0,
        description="Eval rows written to reports/samples.json with the tuned model's label or "
        "continuation",
    )
    max_new_tokens: int = Field(
        40,
        gt=0,
        description="Most tokens generated per sample or answer",
        json_schema_extra=_only("causal_lm", "sft"),
    )
    perplexity: Literal["blocks", "sliding_window"] = Field(
        "blocks",
        description="blocks: score the eval blocks; sliding_window: the eval text as one stream, "
        "every token with context",
        json_schema_extra=_only("causal_lm"),
    )
    stride: int | None = Field(
        None,
        gt=0,
        description="sliding_window: tokens scored per window; null: half of tokenize.max_length",
        json_schema_extra=_only("causal_lm"),
    )
    generate: Literal["auto", True, False] = Field(
        "auto",
        description="Answer every eval prompt, base and tuned, and score the answers; auto: sft",
        json_schema_extra=_only("sft"),
    )
    metrics: Literal["auto"] | list[str] = Field(
        "auto",
        description="Answer scores; auto: accuracy, macro_f1 with labels, else exact_match, "
        "token_f1, rouge_l, chrf, bleu",
        json_schema_extra=_only("sft"),
    )
    labels: Literal["auto"] | list[str] = Field(
        "auto",
        description="The classes when answers are labels, e.g. [negative, positive]; "
        "auto: data.label_names",
        json_schema_extra=_only("sft"),
    )
    do_sample: bool = Field(
        False,
        description="Draw answers at random (seeded by train.seed) instead of the likeliest tokens",
        json_schema_extra=_only("sft"),
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="do_sample: below 1 favours likely tokens more, above 1 less",
        json_schema_extra=_only("sft"),
    )
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="do_sample: draw only from the likeliest tokens that cover this share",
        json_schema_extra=_only("sft"),
    )

    def generates(self, task: str) -> bool:
        return self.generate is True or (self.generate == "auto" and task == "sft")

    def label_set(self, data: DataParams) -> list[str]:
        return data.label_names if self.labels == "auto" else self.labels

    def metric_names(self, data: DataParams) -> list[str]:
        if self.metrics != "auto":
            return self.metrics
        if self.label_set(data):
            return ["accuracy", "macro_f1"]
        return ["exact_match", "token_f1", "rouge_l", "chrf", "bleu"]


class MergeParams(_Section):
    tolerance: Literal["auto"] | Annotated[float, Field(gt=0)] = Field(
        "auto",
        description="Largest logit change from merging, relative to the largest logit; "
        "auto: 1e-4 fp32, 0.1 bf16, 0.05 fp16",
    )
    min_top1_agreement: Literal["auto"] | Annotated[float, Field(ge=0, le=1)] = Field(
        "auto",
        description="Share of probe positions whose top token must not change; "
        "auto: 0.99 fp32, 0.9 bf16, 0.95 fp16",
    )
    probe_size: int = Field(
        8, gt=0, description="Eval rows the merged and unmerged models are compared on"
    )


class HubParams(_Section):
    push: bool = Field(False, description="Opt in to uploading; false: `lorapipe push` refuses")
    repo_id: str | None = Field(
        None, description="Hub repository to upload to, e.g. your-name/model-name"
    )
    private: bool = Field(True, description="Create the repository as private")
    folder: Literal["adapter", "merged"] = Field(
        "adapter", description="What to upload: the adapter, or the merged model"
    )
    dry_run: bool = Field(True, description="List what would be uploaded, without any network")


class Params(_Section):
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
    """The values of dotted keys, e.g. for fingerprinting exactly what a stage reads."""
    dumped = params.model_dump()
    out = {}
    for key in keys:
        value: Any = dumped
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out
