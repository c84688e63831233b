"""Loading: tokenizer, base model (optionally quantized), base + LoRA for training or inference."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from lorapipe import plan
from lorapipe.config import Params, UserError
from lorapipe.lora import check_target_modules, check_variant, lora_config
from lorapipe.quant import bnb_config, compute_dtype, device
from lorapipe.sources import resolve_model
from lorapipe.tasks import get_task


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
        meta = plan.build_meta_model(config, p.task, p.data.num_labels)
    except ValueError as exc:
        raise UserError(
            f"task: the model ({config.model_type}) cannot do {p.task}: {str(exc).splitlines()[0]}"
        ) from None
    check_target_modules(meta, p.lora)
    if p.quant.bits != "none":
        bnb_config(p.quant)
    return config


def load_base(p: Params, quantized: bool = True) -> torch.nn.Module:
    """The base model on the device; k-bit when params ask and `quantized`, else full precision."""
    task = get_task(p.task)
    quant = bnb_config(p.quant) if quantized else None
    dtype = compute_dtype(p.quant) if quant else torch.float32
    model = task.auto_model.from_pretrained(
        resolve_model(p.model.name),
        dtype=dtype,
        quantization_config=quant,
        trust_remote_code=p.model.trust_remote_code,
        **({"device_map": {"": device()}} if quant else {}),
        **task.model_kwargs(p.data),
    )
    if not quant:
        model.to(device())
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(p).pad_token_id
    return model


def load_for_training(p: Params) -> torch.nn.Module:
    model = load_base(p)
    if p.quant.bits != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=p.train.gradient_checkpointing
        )
    elif p.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # frozen embeddings would cut the gradient path
    return get_peft_model(model, lora_config(p))


def load_with_adapter(p: Params, adapter: str | Path, quantized: bool = True) -> PeftModel:
    return PeftModel.from_pretrained(load_base(p, quantized), str(adapter)).eval()
