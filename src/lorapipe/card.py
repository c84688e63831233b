"""Model cards (README.md) for the adapter and merged folders, as hub users expect, and their
Provenance section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lorapipe.config import Params
from lorapipe.tasks import get_task


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


def provenance_section(cert: dict[str, Any]) -> str:
    """A certificate (lorapipe.provenance) in a few lines: how to rebuild this model."""
    git, m, rt = cert["git"], cert["machine"], cert["runtime"]
    dirty = git["dirty"]
    tree = {True: "dirty: " + ", ".join(git.get("changed", [])), False: "clean"}.get(dirty, dirty)
    if "gpu" in m:
        where = f"{m['gpu']} ×{m['count']}, compute capability {m['capability']}"
    else:
        where = f"{m['cpu']} ({', '.join(m['cpu_flags']) or 'no listed vector extensions'})"
    libs = ", ".join(f"{k} {v}" for k, v in cert["versions"].items())
    inputs = cert["inputs"]
    if inputs:
        params = sum(len(v) for v in inputs["params"].values())
        made = (
            f"Made by the `{cert['stage']}` stage of dvc.yaml from {len(inputs['deps'])} deps and "
            f"{params} params values, their md5s and values as dvc.lock records them in "
            f"`certificate.json`. Rebuild: `git checkout {git['commit']} && dvc repro "
            f"{cert['stage']}`; check a copy against a checkout: "
            f"`lorapipe verify {cert['artifact']}`."
        )
    else:
        made = "Written outside a dvc.yaml stage: its inputs are not recorded."
    return (
        f"## Provenance\n\n{made}\n\n"
        f"- commit: `{git['commit']}` (tree {tree})\n"
        f"- libraries: {libs}\n"
        f"- machine: {where}\n"
        f"- runtime: base {rt['base_dtype']}, compute {rt['compute_dtype']}, autocast "
        f"{rt['mixed_precision']}, attention {rt['attn_implementation']}, "
        f"{rt['world_size']} process(es) on {rt['device']}\n\n"
        "<details><summary>Inputs (md5 and params values, as in dvc.lock) and metrics</summary>"
        f"\n\n```json\n{json.dumps({k: cert[k] for k in ('inputs', 'metrics')}, indent=2)}\n```"
        "\n\n</details>\n"
    )


def usage(p: Params, adapter: Path) -> str:
    """The model card's snippet: PEFT alone reads a hub id; a pkg: base needs lorapipe."""
    task = get_task(p.task)
    if not p.model.name.startswith("pkg:") and not p.model.name.endswith(".gguf"):
        auto = task.auto_model.__name__.replace("AutoModel", "AutoPeftModel")
        return f"from peft import {auto}\nmodel = {auto}.from_pretrained('{adapter}')"
    return (
        "from lorapipe.config import load_params\n"
        "from lorapipe.modeling import load_config, load_tokenizer, load_with_adapter\n"
        "from lorapipe.runtime import resolve\n\n"
        "# resolves the base this adapter records (a packaged model) on this machine\n"
        "p = load_params('params.yaml')\n"
        "rt, pad = resolve(p, load_config(p)), load_tokenizer(p).pad_token_id\n"
        f"model = load_with_adapter(p, rt, '{adapter}', pad)"
    )
