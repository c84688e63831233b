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
    scaling = params["lora.alpha"] / params["lora.r"]
    return (
        f"---\n{front}---\n\n# {title}\n\n"
        f"LoRA r={params['lora.r']}, alpha={params['lora.alpha']} (scaling {scaling:g}) on "
        f"{', '.join(params['lora.target_modules'])}; base `{params['model.name']}`, task "
        f"`{params['task']}`, base quantization: {bits}.\n\n"
        f"## Usage\n\n```python\n{usage.strip()}\n```\n\n"
        f"## Metrics\n\n```json\n{json.dumps(metrics, indent=2, sort_keys=True)}\n```\n\n"
        f"## Training params\n\n```yaml\n{yaml.safe_dump(params, sort_keys=False)}```\n"
    )
