"""One side of one gpu-section cell, in its own process (see bench/gpu.py).

python -m bench.gpu_side --materialize Qwen/Qwen2.5-3B --weights DIR [--tiny]
python -m bench.gpu_side --side pipeline|plain --weights DIR --quant none|4 --seq N ...

Both refuse without CUDA unless given --device cpu (the section's CPU mode, on --tiny weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from bench.gpu import NO_CUDA, TARGET_MODULES, cell_params
from lorapipe import plan
from lorapipe.modeling import build_meta_model, load_config
from lorapipe.runtime import Runtime, detect, peak_memory_gb, resolve

# --tiny: the shipped architecture (its attention, MLP, RoPE and tying) at 2 layers of width 64
# and a 1,024-token vocabulary (ids 0 and 1: the tokenizer's <unk> and <eos>): seconds on a CPU.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1024,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def materialize(name: str, out: Path, tiny: bool = False) -> None:
    """The architecture from the shipped config, random bf16 weights, a two-token tokenizer:
    from_pretrained then takes the same path as for a downloaded model."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    config = plan.load_model_config(name)
    if tiny:
        shape = {k: v for k, v in config.to_dict().items() if k != "layer_types"} | TINY
        config = type(config).from_dict(shape)  # layer_types rebuilt for the new depth
    with torch.device(detect().accelerator):  # random init on the GPU: seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    # The rows are random ids; the tokenizer only has to name EOS and pad (the collator's).
    core = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )
    tok.save_pretrained(out)


def synthetic(vocab: int, rows: int, seq: int) -> datasets.Dataset:
    """Full-length rows of random ids, one document per packed block (the tokenize stage's pack
    layout: position_ids, no attention mask); no padding, every token is real and computed."""
    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.tolist()
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "position_ids": [list(range(seq))] * rows,
            "labels": ids,
            "length": [seq] * rows,
        }
    )


class SyncedWindow(TrainerCallback):
    """Times steps warmup+1..last, each end after a host sync (a trainable weight read back),
    so that queued GPU work is inside the window. Before Trainer's final save, on both sides."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step not in (self.warmup, state.max_steps):
            return
        model = kwargs["model"]
        float(next(p for p in model.parameters() if p.requires_grad).detach().sum())  # sync
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        else:
            self.seconds = time.perf_counter() - self.start


def figures(rt: Runtime, window: SyncedWindow, tokens: int, n_params: int) -> dict[str, Any]:
    tps = tokens / window.seconds
    out = {"seconds": round(window.seconds, 2), "tokens_per_s": round(tps, 1)}
    if rt.machine.peak_tflops:
        out["mfu"] = round(4 * n_params * tps / (rt.machine.peak_tflops * 1e12), 4)
    memory = peak_memory_gb(rt)
    out["peak_memory_gb"] = None if memory is None else round(memory, 2)
    return out


def pipeline_side(p: Any, rt: Runtime, data: datasets.Dataset, window: Any, switches: dict) -> None:
    """resolve() + lorapipe.training.train on a tokenized set as the tokenize stage writes it."""
    from lorapipe import training

    if any(switches.values()):  # bench flags, not params: set on the stage's own arguments
        stage_args = training.training_args
        training.training_args = lambda *a, **k: dataclasses.replace(
            stage_args(*a, **k), **switches
        )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        datasets.DatasetDict({"train": data}).save_to_disk(str(root / "tokenized"))
        (root / "tokenized" / "meta.json").write_text(json.dumps({"synthetic": len(data)}))
        training.train(
            p,
            root / "tokenized",
            root / "adapter",
            root / "checkpoint",
            root / "train",
            root / ".work",
            [window],
            rt=rt,
        )


def plain_side(p: Any, rt: Runtime, data: datasets.Dataset, window: Any, switches: dict) -> None:
    """What a minimal HF + PEFT QLoRA script does, with the same settings."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    weights, gc = p.model.name, p.train.gradient_checkpointing
    quant = None
    if p.quant.bits == 4:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(
        # rt.device: cuda:0 as a script would write; the tests run this side on the CPU.
        weights,
        dtype=torch.bfloat16,
        quantization_config=quant,
        device_map={"": rt.device},
    )
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    elif gc:  # what prepare_model_for_kbit_training does about checkpointing, as scripts copy it
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=p.lora.r,
        lora_alpha=p.lora.alpha,
        lora_dropout=p.lora.dropout,
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    tok = AutoTokenizer.from_pretrained(weights)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=p.train.batch_size,
            max_steps=p.train.max_steps,
            learning_rate=p.train.learning_rate,
            bf16=True,
            use_cpu=rt.machine.accelerator == "cpu",  # the tests' CPU run; False on a GPU
            save_strategy="no",
            report_to="none",
            logging_steps=10_000,
            disable_tqdm=True,
            **switches,
        )
        data = data.remove_columns(["length"])
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
        Trainer(
            model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[window]
        ).train()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--materialize", help="a shipped config's model name")
    parser.add_argument("--tiny", action="store_true", help="--materialize: 2 layers, width 64")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--side", choices=["pipeline", "plain"])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--quant", choices=["none", "4"], default="none")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--liger", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (each window end is a synced step)")
    return args


def measure(a: argparse.Namespace) -> dict[str, Any]:
    """Train one side on synthetic rows; its tokens/s, MFU and peak memory."""
    batch = max(1, a.tokens_per_step // a.seq)
    total = a.warmup + a.steps
    p = cell_params(str(a.weights), a.seq, a.quant, batch, total, not a.no_checkpointing)
    config = load_config(p)
    rt = resolve(p, config)
    # N for the MFU: the base's parameters, counted on a meta copy (no memory).
    n_params = sum(t.numel() for t in build_meta_model(config, "causal_lm").parameters())
    data = synthetic(config.vocab_size, total * batch, a.seq)
    window = SyncedWindow(a.warmup)
    switches = {"use_liger_kernel": a.liger, "torch_compile": a.compile}
    if a.side == "pipeline":
        pipeline_side(p, rt, data, window, switches)
    else:
        plain_side(p, rt, data, window, switches)
    result = figures(rt, window, a.steps * batch * a.seq, n_params)
    result |= {"batch": batch, "timed_steps": a.steps, "base_params": n_params}
    if a.side == "pipeline":
        result["runtime"] = {k: str(v) for k, v in rt.summary().items()}
    return result


def main() -> None:
    a = parse()
    if a.device != detect().accelerator:
        why = NO_CUDA if a.device == "cuda" else "--device cpu, but CUDA_VISIBLE_DEVICES is not ''"
        raise SystemExit(f"bench.gpu_side: {why}")
    if a.materialize:
        materialize(a.materialize, a.weights, a.tiny)
        return
    a.out.write_text(json.dumps(measure(a), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
