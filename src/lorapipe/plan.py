"""Weight-free LoRA planning: exact PEFT parameter counts and a GPU memory estimate.

Everything here works from a model's ``config.json`` alone: the model is built on the
meta device, so a 70B model is planned in seconds without downloading or allocating weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoConfig,
    PretrainedConfig,
)
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

if TYPE_CHECKING:  # peft takes seconds to import; `lorapipe check` needs none of it
    from peft import LoraConfig

MODEL_CONFIGS_DIR = Path(__file__).parent / "model_configs"
GIB = 2**30
NAMED_DEVICES_GB = (24.0, 40.0, 80.0)


def load_model_config(name: str) -> PretrainedConfig:
    """Config from a local folder, else a shipped copy, else the hub (or its local cache)."""
    from lorapipe.hub import hub_reachable
    from lorapipe.model_sources import resolve_model

    if name.startswith("pkg:") or Path(name).exists():
        name = resolve_model(name)  # a packaged or GGUF model: its (converted) folder
    folder = Path(name)
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    shipped = MODEL_CONFIGS_DIR / f"{name.replace('/', '--')}.json"
    if shipped.is_file():
        return AutoConfig.for_model(**json.loads(shipped.read_text()))
    try:
        # Offline, only the local cache: not huggingface_hub's ~25 s of retries.
        return AutoConfig.from_pretrained(name, local_files_only=not hub_reachable())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"no config for {name!r}: not a local folder, none shipped in lorapipe/model_configs, "
            "and the Hugging Face hub is unreachable or has no such model"
        ) from exc


def count_trainable(
    config: PretrainedConfig, lora_config: LoraConfig, task: str, num_labels: int = 2
) -> dict:
    """Wrap a meta model with real PEFT LoRA and count parameters exactly as PEFT reports them.

    `lora_config`: the one training uses (lorapipe.lora.lora_config(p)), so DoRA's magnitude
    vectors, rank_pattern, all-linear and bias are counted as PEFT will count them.
    """
    from lorapipe.modeling import build_meta_model

    model = build_meta_model(config, task, num_labels)
    base_params = sum(p.numel() for p in model.parameters())
    # Mirror bitsandbytes: every nn.Linear is quantized except the output embedding, tied
    # weights and the last module (transformers' own skip list), so reuse that list.
    skip = get_keys_to_not_convert(model)
    quantizable = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if type(m) is torch.nn.Linear and should_convert_module(n, skip)
    )
    # The init only sets values (pissa/olora factorize W, which meta tensors do not hold): the
    # shapes, hence the counts, are those of the default init.
    from peft import get_peft_model

    lora_config = dataclasses.replace(lora_config, init_lora_weights=True)
    peft_model = get_peft_model(model, lora_config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    per_module: dict[str, int] = {}  # in the model's order
    for name, param in peft_model.named_parameters():
        if ".lora_" in name:
            # "...layer.0.attention.self.query.lora_A.default.weight" -> "query"
            module = name.split(".lora_")[0].rsplit(".", 1)[-1]
            per_module[module] = per_module.get(module, 0) + param.numel()
    return {
        "task": task,
        "num_labels": num_labels,
        "trainable": trainable,
        "all": total,
        "percent": 100 * trainable / total,
        "base_params": base_params,
        "quantizable_params": quantizable,
        "lora_params": sum(per_module.values()),
        "lora_per_module": per_module,
    }


def estimate_memory(
    config: PretrainedConfig,
    counts: dict,
    bits: int | None,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    compute_dtype_bytes: int = 2,
    double_quant: bool = True,
) -> dict:
    """Estimate peak training memory in bytes, per component. An estimate, not a measurement.

    Not included: CUDA context, allocator fragmentation, temporary dequantization buffers.
    """
    if bits not in (None, 4, 8):
        raise ValueError(f"bits must be 4, 8 or None, got {bits!r}")
    trainable = counts["trainable"]
    frozen = counts["all"] - trainable
    quantized = counts["quantizable_params"] if bits else 0
    if bits == 4:
        # NF4 packs two weights per byte; absmax is one fp32 per 64-weight block (0.5 bit), or
        # with double quantization an 8-bit absmax plus fp32 per 256 blocks (~0.127 bit).
        absmax_bits = 8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64
        per_quantized = 0.5 + absmax_bits / 8
    else:
        # LLM.int8 stores one byte per weight (its per-row fp32 scales are negligible).
        per_quantized = 1.0
    # Embeddings, norms, biases and heads are never quantized and stay in compute dtype.
    weights = quantized * per_quantized + (frozen - quantized) * compute_dtype_bytes

    # Activations after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    # Transformer Models"): one layer keeps s*b*h*(34 + 5*a*s/h) bytes in 16-bit. The 5*a*s/h
    # attention-score term is absent with SDPA/flash attention, so this errs high.
    s, b = seq_len, batch_size
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    per_layer = s * b * h * (34 + 5 * heads * s / h)
    if gradient_checkpointing:
        # Only each layer's 16-bit input is kept; one layer is recomputed at a time in backward.
        activations = layers * 2 * s * b * h + per_layer
    else:
        activations = layers * per_layer
    activations *= compute_dtype_bytes / 2  # the formula counts 16-bit activations
    # The loss upcasts logits to fp32; for causal LM that is a full vocabulary row per token.
    width = config.vocab_size if counts["task"] != "seq_cls" else counts["num_labels"]
    logits = b * (s if counts["task"] != "seq_cls" else 1) * width * 4

    memory = {
        "weights": weights,
        "adapters": trainable * 4,  # fp32 LoRA matrices (and any modules_to_save copies)
        "gradients": trainable * 4,  # fp32, only for trainable parameters
        "optimizer": trainable * 8,  # AdamW: exp_avg and exp_avg_sq in fp32
        "activations": activations,
        "logits": logits,
    }
    memory = {k: int(v) for k, v in memory.items()}
    memory["total"] = sum(memory.values())
    return memory


def estimate_eval_memory(
    config: PretrainedConfig, counts: dict, weights: int, batch_size: int, seq_len: int
) -> dict:
    """Peak memory of an evaluation batch: no gradients or optimizer, one layer's activations at
    a time, and the logits with their fp32 upcast and log-softmax (the term that grows with the
    vocabulary, which the runtime bounds through the evaluation batch size)."""
    s, b, h = seq_len, batch_size, config.hidden_size
    width = config.vocab_size if counts["task"] != "seq_cls" else counts["num_labels"]
    rows = s if counts["task"] != "seq_cls" else 1
    memory = {
        "weights": weights,
        "adapters": counts["trainable"] * 4,
        "activations": int(s * b * h * 34),
        "logits": int(b * rows * width * (2 + 4 + 4)),
    }
    memory["total"] = sum(memory.values())
    return memory


def machine_plan(p: Any, machine: Any) -> dict:
    """What `p` resolves to on `machine`, with training and evaluation peaks per device."""
    from lorapipe.lora import lora_config
    from lorapipe.runtime import resolve

    config = load_model_config(p.model.name)
    rt = resolve(p, config, machine)
    bits = None if p.quant.bits == "none" else int(p.quant.bits)
    counts = count_trainable(config, lora_config(p), p.task, p.data.num_labels)
    by_gc = {
        gc: estimate_memory(
            config,
            counts,
            bits,
            p.train.batch_size,
            p.tokenize.max_length,
            gc,
            compute_dtype_bytes=rt.base_dtype.itemsize,
            double_quant=p.quant.double_quant,
        )
        for gc in (False, True)
    }
    train = by_gc[p.train.gradient_checkpointing]
    evaluation = estimate_eval_memory(
        config, counts, train["weights"], rt.eval_batch_size, p.tokenize.max_length
    )
    capacity = machine.memory_gb * 1e9
    return {
        "runtime": rt.summary(),
        "counts": counts,
        "train_memory": train,
        "train_memory_by_gc": by_gc,
        "eval_memory": evaluation,
        "fits": max(train["total"], evaluation["total"]) <= capacity,
        "batch": (p.train.batch_size, p.train.grad_accum, rt.world_size),
        "effective_batch_size": p.train.batch_size * p.train.grad_accum * rt.world_size,
    }


def format_machine_plan(plan: dict) -> str:
    rt = plan["runtime"]
    b, k, d = plan["batch"]
    keys = (
        "device",
        "device_map",
        "base_dtype",
        "compute_dtype",
        "mixed_precision",
        "attn_implementation",
        "optim",
        "gradient_checkpointing_kwargs",
        "ddp_find_unused_parameters",
        "tf32",
        "eval_batch_size",
    )
    why = rt.get("reasons", {})
    lines = [f"Runtime on {rt['machine']} ({d} process(es), devices {rt['rank_devices']}):"]
    lines += [f"  {key:<30} {rt[key]}" + (f"  ← {why[key]}" if key in why else "") for key in keys]
    lines += [
        f"Peak per device: training {plan['train_memory']['total'] / GIB:.2f} GiB, "
        f"evaluation {plan['eval_memory']['total'] / GIB:.2f} GiB "
        f"(batch {rt['eval_batch_size']}); fits: {'yes' if plan['fits'] else 'NO'}",
        f"Effective batch: B {b} x K {k} x D {d} = {plan['effective_batch_size']}",
    ]
    return "\n".join(lines)


def peft_line(counts: dict) -> str:
    """The exact line PEFT's ``print_trainable_parameters`` prints."""
    return (
        f"trainable params: {counts['trainable']:,d} || all params: {counts['all']:,d} "
        f"|| trainable%: {counts['percent']:.4f}"
    )


def format_plan(
    model_name: str,
    counts: dict,
    memory_no_gc: dict,
    memory_gc: dict,
    device_gb: float | None = None,
) -> str:
    """Human-readable report: PEFT counts, LoRA params per module, memory table and fit."""
    lora = counts["lora_params"]
    lines = [
        f"Model: {model_name} ({counts['task']}, base {counts['base_params']:,d} params)",
        peft_line(counts),
        f"LoRA params: {lora:,d} (base/LoRA = {counts['base_params'] / lora:,.1f}x)",
        *(f"  {module}: {n:,d}" for module, n in counts["lora_per_module"].items()),
        "",
        f"Estimated memory (GiB)   {'no grad ckpt':>13} {'grad ckpt':>10}",
    ]
    for key in memory_no_gc:
        lines.append(f"  {key:<22} {memory_no_gc[key] / GIB:>13.2f} {memory_gc[key] / GIB:>10.2f}")
    # Capacity is taken as device_gb * 1e9 bytes: the ~7% gap to the GiB a card really has is
    # left as headroom for the CUDA context and fragmentation the estimate leaves out.
    devices = sorted({*NAMED_DEVICES_GB, *([device_gb] if device_gb else [])})
    lines.append("Fits:")
    for gb in devices:
        fits = ["yes" if m["total"] <= gb * 1e9 else "no" for m in (memory_no_gc, memory_gc)]
        lines.append(f"  {gb:g} GB: {fits[0]} without / {fits[1]} with gradient checkpointing")
    return "\n".join(lines)


def plan(
    model_name: str,
    task: str,
    r: int,
    alpha: int,
    target_modules: list[str],
    num_labels: int,
    bits: int | None,
    batch_size: int,
    seq_len: int,
    device_gb: float | None = None,
) -> str:
    """Load the config, count with PEFT on meta, estimate memory both ways and format it."""
    from peft import LoraConfig

    from lorapipe.tasks import get_task

    config = load_model_config(model_name)
    lora_config = LoraConfig(
        task_type=get_task(task).peft_task_type,
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules,
    )
    counts = count_trainable(config, lora_config, task, num_labels)
    memory = [
        estimate_memory(config, counts, bits, batch_size, seq_len, gradient_checkpointing=gc)
        for gc in (False, True)
    ]
    return format_plan(model_name, counts, *memory, device_gb=device_gb)
