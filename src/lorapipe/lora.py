"""LoraConfig from params (every variant through PEFT), and the checks that it fits the model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from lorapipe.config import Params, UserError
from lorapipe.io import read_json, write_json
from lorapipe.sections_model import ALL_LINEAR, LoraParams
from lorapipe.tasks import get_task

if TYPE_CHECKING:  # peft takes seconds to import: the checks that run before it need none
    from peft import LoraConfig, PeftModel

# Inits that move the top of W into A·B (W_res = W − s·B0·A0): the saved adapter is converted to
# a plain LoRA of rank 2r (ΔW = B·A − B0·A0) that applies to the original base.
RESIDUAL_INITS = ("pissa", "olora")


def lora_config(p: Params) -> LoraConfig:
    """h = Wx + s·B·A·x with s = alpha/r (alpha/√r under rsLoRA); DoRA rescales each column."""
    from peft import LoraConfig

    lora = p.lora
    return LoraConfig(
        task_type=get_task(p.task).peft_task_type,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=ALL_LINEAR if lora.target_modules == [ALL_LINEAR] else lora.target_modules,
        bias=lora.bias,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=True if lora.init in (True, "kaiming") else lora.init,
        rank_pattern=dict(lora.rank_pattern),
        alpha_pattern=dict(lora.alpha_pattern),
    )


def scaling(lora: LoraParams) -> float:
    """The factor on B·A for layers without a pattern override."""
    return lora.alpha / (lora.r**0.5 if lora.use_rslora else lora.r)


def check_variant(p: Params) -> None:
    """Refuse what PEFT would refuse (or silently get wrong) for this base, before weights load."""
    lora, bits = p.lora, p.quant.bits
    if lora.init == "loftq":
        # peft 0.21's loftq_init/replace_lora_weights_loftq compute on "cuda" only, and the adapter
        # they give complements the 4-bit weights: merged into the full-precision base it is wrong.
        raise UserError(
            "lora.init: loftq is not supported (PEFT computes it on CUDA only, and its adapter "
            "fits the 4-bit weights, not the full-precision base the merge stage uses); "
            "use kaiming, gaussian, pissa or olora"
        )
    if lora.init in RESIDUAL_INITS:
        if bits != "none":
            # PEFT raises for pissa on k-bit weights; olora re-quantizes W_res, so the converted
            # adapter would not match Quant(W) + ΔW.
            raise UserError(
                f"lora.init: {lora.init} needs full-precision base weights (it factorizes W), "
                f"not quant.bits: {bits}; set quant.bits: none or lora.init: kaiming"
            )
        if lora.use_dora:
            raise UserError(
                f"lora.use_dora: cannot combine with lora.init: {lora.init} (the saved adapter is "
                "converted to plain LoRA ΔW = BA − B0A0, which has no DoRA magnitude)"
            )
        if lora.bias != "none":
            # The conversion loads the initial adapter beside the trained one: PEFT allows a
            # trained bias on one adapter only.
            raise UserError(
                f"lora.bias: {lora.bias} cannot combine with lora.init: {lora.init} (PEFT's "
                "conversion to a plain LoRA of the original base needs bias: none)"
            )
        if lora.use_rslora and (lora.rank_pattern or lora.alpha_pattern):
            raise UserError(
                f"lora.use_rslora: PEFT cannot convert a {lora.init} adapter back to the original "
                "base with rank_pattern/alpha_pattern under rsLoRA; drop one of them"
            )


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The short names (`query`, `q_proj`) of the Linear layers LoRA can target."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model: torch.nn.Module, lora: LoraParams) -> None:
    """Every named target and every rank/alpha pattern key must match a layer of the model."""
    if lora.target_modules == [ALL_LINEAR]:
        targets = None  # PEFT picks them
    else:
        targets = list(lora.target_modules)
        available = linear_layer_names(model)
        missing = [t for t in targets if t not in available]
        if missing:
            raise UserError(
                f"lora.target_modules: {', '.join(missing)} match no layer of the model; "
                f"its linear layers are: {', '.join(available)}"
            )
    linear = [
        n
        for n, m in model.named_modules()
        if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
        and (targets is None or n.rsplit(".", 1)[-1] in targets)
    ]
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(lora, field):
            # PEFT's own rule (peft.utils.other.get_pattern_key): the key matches a name's tail.
            if not any(re.match(rf"(.*\.)?({key})$", n) for n in linear):
                raise UserError(f"lora.{field}: '{key}' matches no targeted layer of the model")


def save_adapter(model: PeftModel, out: Path, initial: Path | None) -> None:
    """Save the adapter so that it applies to the ORIGINAL base.

    `initial`: the adapter as a residual init (pissa/olora) left it before training; PEFT then
    saves ΔW = B·A − B0·A0 as a rank-2r LoRA. Its conversion keeps only lora_A/lora_B, so the
    other trained tensors (a classifier head, biases) are copied over from a plain save.
    """
    if initial is None:
        model.save_pretrained(out)
        return
    model.save_pretrained(out)
    weights = out / "adapter_model.safetensors"
    plain = load_file(weights)
    model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial))
    converted = load_file(weights)
    kept = {k: v for k, v in plain.items() if ".lora_A." not in k and ".lora_B." not in k}
    save_file({**kept, **converted}, weights, metadata={"format": "pt"})


def make_portable(folder: Path, name: str) -> None:
    """Record the base as params name it (pkg:…, hub id), not as the folder it loaded from, and
    the target modules in a stable order: the same adapter, the same bytes on every machine.

    PEFT writes the resolved folder, for a packaged model a path inside this virtualenv: another
    machine could not load it, and the adapter's DVC hash would differ per venv path.
    modeling.load_with_adapter resolves the name on the machine that loads it. (Rewritten after
    saving: PEFT's save looks the recorded name up as a folder or on the hub.) PEFT keeps
    target_modules as a set, saved in string-hash order, which changes from process to process.
    """
    config = folder / "adapter_config.json"
    raw = read_json(config)
    old, raw["base_model_name_or_path"] = raw.get("base_model_name_or_path"), name
    if isinstance(raw.get("target_modules"), list):  # not a regex or "all-linear"
        raw["target_modules"] = sorted(raw["target_modules"])
    write_json(config, raw)
    readme = folder / "README.md"  # PEFT's own card (in checkpoints) names the base too
    if old and readme.is_file():
        readme.write_text(readme.read_text(encoding="utf-8").replace(old, name), encoding="utf-8")
