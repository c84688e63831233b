"""Model cards (README.md) for the adapter and merged folders, as hub users expect."""

from __future__ import annotations

import json
from typing import Any

import yaml


def model_card(title: str, params: dict[str, Any], metrics: dict[str, Any], usage: str) -> str:
    """`params`: the dotted keys that produced the model (never a token or other secret)."""
    bits = params["quant.bits"]
    tags = ["lora", "peft", "dvc", params["task"]] + (["qlora"] if bits == 4 else [])
    front = yaml.safe_dump(
        {"library_name": "peft", "base_model": params["model.name"], "tags": tags}
    )
    r, alpha, targets = params["lora.r"], params["lora.alpha"], params["lora.target_modules"]
    # Older adapters' params lack the variant keys: they were plain LoRA.
    rs = params.get("lora.use_rslora", False)
    rule = f"alpha/√r = {alpha / r**0.5:g}, rsLoRA" if rs else f"alpha/r = {alpha / r:g}"
    variants = [
        text
        for key, text in (
            ("lora.use_dora", "DoRA (a magnitude vector per layer)"),
            ("lora.rank_pattern", f"per-layer r {params.get('lora.rank_pattern')}"),
            ("lora.alpha_pattern", f"per-layer alpha {params.get('lora.alpha_pattern')}"),
            ("lora.plus_lr_ratio", f"LoRA+ (lr of B = {params.get('lora.plus_lr_ratio')} × lr)"),
        )
        if params.get(key)
    ]
    init = params.get("lora.init", "kaiming")
    if init not in (True, "kaiming"):
        variants.append(f"{init} init (saved as plain LoRA of the original base, rank 2r)")
    if params.get("lora.bias", "none") != "none":
        variants.append(f"bias: {params['lora.bias']}")
    return (
        f"---\n{front}---\n\n# {title}\n\n"
        f"LoRA r={r}, alpha={alpha} (scaling {rule}) on "
        f"{', '.join(targets)}"
        f"{''.join('; ' + v for v in variants)}; base `{params['model.name']}`, task "
        f"`{params['task']}`, base quantization: {bits}.\n\n"
        f"## Usage\n\n```python\n{usage.strip()}\n```\n\n"
        f"## Metrics\n\n```json\n{json.dumps(metrics, indent=2, sort_keys=True)}\n```\n\n"
        f"## Training params\n\n```yaml\n{yaml.safe_dump(params, sort_keys=False)}```\n"
    )
