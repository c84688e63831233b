"""The params sections of how it runs: train, evaluate, merge, hub (see sections_model)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lorapipe.sections_model import DataParams, Section, only_for


class TrainParams(Section):
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
    search_trial: str | None = Field(
        None,
        description="Set by lorapipe search (pruner on): the trial (<study>-<number>) that may "
        "stop this run early; null otherwise",
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


class EvaluateParams(Section):
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
        json_schema_extra=only_for("causal_lm", "sft"),
    )
    perplexity: Literal["blocks", "sliding_window"] = Field(
        "blocks",
        description="blocks: score the eval blocks; sliding_window: the eval text as one stream, "
        "every token with context",
        json_schema_extra=only_for("causal_lm"),
    )
    stride: int | None = Field(
        None,
        gt=0,
        description="sliding_window: tokens scored per window; null: half of tokenize.max_length",
        json_schema_extra=only_for("causal_lm"),
    )
    generate: Literal["auto", True, False] = Field(
        "auto",
        description="Answer every eval prompt, base and tuned, and score the answers; auto: sft",
        json_schema_extra=only_for("sft"),
    )
    metrics: Literal["auto"] | list[str] = Field(
        "auto",
        description="Answer scores; auto: accuracy, macro_f1 with labels, else exact_match, "
        "token_f1, rouge_l, chrf, bleu",
        json_schema_extra=only_for("sft"),
    )
    labels: Literal["auto"] | list[str] = Field(
        "auto",
        description="The classes when answers are labels, e.g. [negative, positive]; "
        "auto: data.label_names",
        json_schema_extra=only_for("sft"),
    )
    do_sample: bool = Field(
        False,
        description="Draw answers at random (seeded by train.seed) instead of the likeliest tokens",
        json_schema_extra=only_for("sft"),
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="do_sample: below 1 favours likely tokens more, above 1 less",
        json_schema_extra=only_for("sft"),
    )
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="do_sample: draw only from the likeliest tokens that cover this share",
        json_schema_extra=only_for("sft"),
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


class MergeParams(Section):
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


class HubParams(Section):
    push: bool = Field(False, description="Opt in to uploading; false: `lorapipe push` refuses")
    repo_id: str | None = Field(
        None, description="Hub repository to upload to, e.g. your-name/model-name"
    )
    private: bool = Field(True, description="Create the repository as private")
    folder: Literal["adapter", "merged"] = Field(
        "adapter", description="What to upload: the adapter, or the merged model"
    )
    dry_run: bool = Field(True, description="List what would be uploaded, without any network")
