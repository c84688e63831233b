"""LoraConfig from params, and the check that every target module exists in the model."""

from __future__ import annotations

import torch
from peft import LoraConfig

from lorapipe.config import Params, UserError
from lorapipe.tasks import get_task


def lora_config(p: Params) -> LoraConfig:
    """h = Wx + b + (alpha/r)·B·A·x; PEFT starts A random (Kaiming) and B at zero."""
    return LoraConfig(
        task_type=get_task(p.task).peft_task_type,
        r=p.lora.r,
        lora_alpha=p.lora.alpha,
        lora_dropout=p.lora.dropout,
        target_modules=list(p.lora.target_modules),
        bias="none",
    )


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The short names (`query`, `q_proj`) of the Linear layers LoRA can target."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    available = linear_layer_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise UserError(
            f"lora.target_modules: {', '.join(missing)} match no layer of the model; "
            f"its linear layers are: {', '.join(available)}"
        )
