"""The params sections of what is trained: data, model, tokenize, lora, quant.

Each key's default and one-line description live here (params.yaml is rendered from them);
lorapipe.config puts the sections together and checks them against each other.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

ALL_LINEAR = "all-linear"


def only_for(*tasks: str) -> dict[str, Any]:
    """json_schema_extra of a key only these tasks read (params.yaml marks it)."""
    return {"tasks": list(tasks)}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
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
        json_schema_extra=only_for("seq_cls", "causal_lm"),
    )
    label_field: str = Field(
        "label",
        description="Column holding each row's class, an integer from 0",
        json_schema_extra=only_for("seq_cls"),
    )
    num_labels: int = Field(
        2,
        ge=2,
        description="Number of classes; labels run from 0 to num_labels - 1",
        json_schema_extra=only_for("seq_cls"),
    )
    format: Literal["pair", "messages", "alpaca", "sharegpt"] = Field(
        "pair",
        description="Row layout: pair (a prompt and a response column), messages (chat turns), "
        "alpaca, or sharegpt",
        json_schema_extra=only_for("sft"),
    )
    input_field: str = Field(
        "input",
        description="Column holding the prompt (format: pair)",
        json_schema_extra=only_for("sft"),
    )
    output_field: str = Field(
        "output",
        description="Column holding the response the model learns to write (format: pair)",
        json_schema_extra=only_for("sft"),
    )
    separator: str = Field(
        "\n### Response:\n",
        description="Text put between prompt and response when no chat template is used",
        json_schema_extra=only_for("sft"),
    )
    input_template: str | None = Field(
        None,
        description="Builds each prompt from a row's columns, e.g. 'Review: {sentence}'; "
        "null: the input_field column",
        json_schema_extra=only_for("sft"),
    )
    label_names: list[str] = Field(
        default_factory=list,
        description="Words for an integer output_field, the first for 0, e.g. [negative, positive]",
        json_schema_extra=only_for("sft"),
    )
    chat_template: bool = Field(
        False,
        description="Wrap prompt and response in the tokenizer's chat template, not the separator",
        json_schema_extra=only_for("sft"),
    )
    max_train_rows: int | None = Field(
        None, gt=0, description="Use only the first this-many training rows; null: all of them"
    )
    max_eval_rows: int | None = Field(
        None, gt=0, description="Use only the first this-many eval rows; null: all of them"
    )


class ModelParams(Section):
    name: str = Field(
        description="Base model: a hub id, a local folder, a .gguf file, or "
        "pkg:<distribution>/<path> (from a package)"
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a hub model; only if you trust its author"
    )


class TokenizeParams(Section):
    max_length: int = Field(
        128, gt=0, description="Most tokens per example (per block when packed); longer text is cut"
    )
    layout: Literal["pack", "pad"] = Field(
        "pack",
        description="pack: whole documents packed into full blocks, none seeing another; "
        "pad: one example per row, padded",
        json_schema_extra=only_for("causal_lm", "sft"),
    )


def _all_linear(value: Any) -> Any:
    return [value] if value == ALL_LINEAR else value


class LoraParams(Section):
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


class QuantParams(Section):
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
