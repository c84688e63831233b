"""Loading: tokenizer, base model (optionally quantized), base + LoRA for training or inference.

Every device and dtype choice comes from the Runtime the stage resolved (lorapipe.runtime); the
speed switches (compile, Liger's kernels) and deterministic algorithms are checked against it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import init_empty_weights
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import is_liger_kernel_available

from lorapipe.config import Params, UserError
from lorapipe.lora import check_target_modules, check_variant, lora_config
from lorapipe.model_sources import resolve_model
from lorapipe.quant import bnb_config, check_bitsandbytes
from lorapipe.runtime import Runtime
from lorapipe.tasks import TASKS, get_task

if TYPE_CHECKING:  # peft takes seconds to import: `lorapipe check` needs none of it
    from peft import PeftModel


def load_config(p: Params) -> PretrainedConfig:
    path = resolve_model(p.model.name)
    return AutoConfig.from_pretrained(path, trust_remote_code=p.model.trust_remote_code)


def load_tokenizer(p: Params) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(
        resolve_model(p.model.name), trust_remote_code=p.model.trust_remote_code
    )
    if tok.pad_token is None:  # most causal LMs ship none; padded positions are masked anyway
        tok.pad_token = tok.eos_token
    return tok


def build_meta_model(config: PretrainedConfig, task: str, num_labels: int = 2) -> PreTrainedModel:
    """Instantiate the model on the meta device: shapes only, no weight memory."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    config = copy.deepcopy(config)  # don't change the caller's config
    for key, value in TASKS[task].model_kwargs(num_labels).items():
        setattr(config, key, value)
    # include_buffers=True also keeps rotary caches etc. off the CPU.
    with init_empty_weights(include_buffers=True):
        return TASKS[task].auto_model.from_config(config)


def check_max_length(p: Params, config: PretrainedConfig) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit and p.tokenize.max_length > limit:
        raise UserError(
            f"tokenize.max_length: {p.tokenize.max_length} exceeds the model's position limit "
            f"{limit}"
        )


def preflight(p: Params) -> PretrainedConfig:
    """Checks that need the model's shape but not its weights: seconds, before heavy work."""
    check_variant(p)  # params alone: no config needed
    config = load_config(p)
    check_max_length(p, config)
    try:
        meta = build_meta_model(config, p.task, p.data.num_labels)
    except ValueError as exc:
        raise UserError(
            f"task: the model ({config.model_type}) cannot do {p.task}: {str(exc).splitlines()[0]}"
        ) from None
    check_target_modules(meta, p.lora)
    if p.quant.bits != "none":
        check_bitsandbytes()
    return config


def load_base(
    p: Params, rt: Runtime, pad_token_id: int | None, quantized: bool = True
) -> torch.nn.Module:
    """The base on this rank's device, in the runtime's dtype; k-bit when params ask and
    `quantized`, else full precision (the merge's case)."""
    task = get_task(p.task)
    quant = bnb_config(p.quant, rt.compute_dtype, task.kbit_skip_modules) if quantized else None
    model = task.auto_model.from_pretrained(
        resolve_model(p.model.name),
        dtype=rt.base_dtype,
        quantization_config=quant,
        trust_remote_code=p.model.trust_remote_code,
        attn_implementation=rt.attn_implementation,
        **({"device_map": rt.device_map} if rt.device_map else {}),
        **task.model_kwargs(p.data.num_labels),
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def prepare_for_training(model: torch.nn.Module, p: Params, rt: Runtime) -> torch.nn.Module:
    """Freeze the base and switch on checkpointing.

    Written instead of PEFT's prepare_model_for_kbit_training, which upcasts every non-quantized
    weight (embeddings, lm_head, norms) to fp32: 1.2 GB on Qwen2.5-3B, 4.2 GB on Llama-3.1-8B.
    Here they stay in the compute dtype; autocast and the fp32 LoRA weights keep training stable.
    """
    for param in model.parameters():
        param.requires_grad = False
    if p.train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input-grad hook and is safe under DDP.
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=rt.gradient_checkpointing_kwargs
        )
    return model


def speed_switches(p: Params, rt: Runtime) -> dict[str, Any]:
    """TrainingArguments' speed fields from params; Liger refused where it cannot run."""
    if p.train.liger and rt.machine.accelerator != "cuda":
        raise UserError(
            f"train.liger: Liger's kernels need a CUDA GPU (this machine: {rt.machine.name}); "
            "set train.liger: false"
        )
    if p.train.liger and not is_liger_kernel_available():
        raise UserError(
            "train.liger: the liger-kernel package (>= 0.3.0) is not installed: "
            "pip install liger-kernel, or set train.liger: false"
        )
    return {"torch_compile": p.train.compile, "use_liger_kernel": p.train.liger}


def use_deterministic(on: bool, rt: Runtime) -> None:
    """torch's deterministic algorithms (an op without one raises), before the model loads.

    Not TrainingArguments' full_determinism: that also sets CUDA_LAUNCH_BLOCKING=1 (every kernel
    launch waits for the last) and a cuBLAS workspace of 8 × 16 KiB; here 8 × 4 MiB.
    """
    if on and rt.machine.accelerator == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ.setdefault("FLASH_ATTENTION_DETERMINISTIC", "1")  # flash-attn's backward
    torch.use_deterministic_algorithms(on)


def load_for_training(p: Params, rt: Runtime, tok: PreTrainedTokenizerBase) -> torch.nn.Module:
    from peft import get_peft_model

    model = prepare_for_training(load_base(p, rt, tok.pad_token_id), p, rt)
    model = get_peft_model(model, lora_config(p))
    for param in model.parameters():
        if param.requires_grad:
            # LoRA A/B (PEFT already does) and the head copy (a bf16 base's is bf16): fp32, so
            # optimizer updates are not lost to rounding and fp16's GradScaler can unscale them.
            param.data = param.data.float()
    return model


def check_adapter_base(p: Params, adapter: str | Path) -> None:
    """The base the adapter records (pkg:…, hub id; an older adapter: a folder), resolved on
    this machine, must be model.name's: another base would load and predict garbage."""
    config = Path(adapter) / "adapter_config.json"
    recorded = (
        json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
    )
    if not recorded or recorded == p.model.name:
        return
    try:
        same = resolve_model(recorded, str(config)) == resolve_model(p.model.name)
    except UserError:
        return  # a folder of another machine (an adapter saved before names were portable)
    if not same:
        raise UserError(
            f"model.name: '{p.model.name}' is not the base {adapter} was trained on ('{recorded}')"
        )


def load_with_adapter(
    p: Params,
    rt: Runtime,
    adapter: str | Path,
    pad_token_id: int | None,
    quantized: bool = True,
) -> PeftModel:
    from peft import PeftModel

    check_adapter_base(p, adapter)
    base = load_base(p, rt, pad_token_id, quantized)
    return PeftModel.from_pretrained(base, str(adapter)).eval()
