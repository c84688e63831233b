"""What the machine makes of the params: the one place that decides every device choice.

`resolve(params, config, machine)` is a pure function. The machine is either detected
(`detect()`, the only code in the project that asks torch.cuda anything) or described by name
for planning (`describe("h100x8")`), so the table tests on a CPU are the GPU's specification and
`lorapipe plan --machine` prints the same choices a GPU run makes. Each stage resolves once and
passes the Runtime down.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorapipe.config import Params, UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GB = 1e9

# Per device: memory (GB), native bf16, TF32 tensor cores, dense 16-bit tensor TFLOP/s from the
# vendor's datasheet (bf16; fp16 on the T4, which has no bf16), compute capability.
GPUS: dict[str, dict[str, Any]] = {
    "t4": {"memory_gb": 16, "bf16": False, "tf32": False, "peak_tflops": 65, "capability": 7.5},
    "a10g": {"memory_gb": 24, "bf16": True, "tf32": True, "peak_tflops": 70, "capability": 8.6},
    "l4": {"memory_gb": 24, "bf16": True, "tf32": True, "peak_tflops": 121, "capability": 8.9},
    "a100-40": {"memory_gb": 40, "bf16": True, "tf32": True, "peak_tflops": 312, "capability": 8.0},
    "a100-80": {"memory_gb": 80, "bf16": True, "tf32": True, "peak_tflops": 312, "capability": 8.0},
    "h100": {"memory_gb": 80, "bf16": True, "tf32": True, "peak_tflops": 989, "capability": 9.0},
}
# Logits of one evaluation batch (compute dtype + the fp32 upcast + log-softmax) may take this
# share of a device: a 152k vocabulary at 64 x 512 tokens would otherwise hold ~50 GB.
EVAL_LOGITS_SHARE = 1 / 8


@dataclass(frozen=True)
class Machine:
    """A machine as the resolver sees it: what kind of device, how many, how big, what math."""

    name: str
    accelerator: str  # "cuda" | "cpu"
    count: int  # devices of that kind (1 for a CPU)
    memory_gb: float  # per device (host memory for a CPU)
    bf16: bool  # native bf16 math (GPU: sm80+; CPU: AVX512-BF16 / AMX)
    tf32: bool = False
    peak_tflops: float | None = None  # dense 16-bit, per device: the MFU denominator
    flash_attention: bool = False  # flash-attn installed and the GPU is sm80+
    local_rank: int = 0


@dataclass(frozen=True)
class Runtime:
    """Every device-dependent choice for one rank, resolved once per stage."""

    machine: Machine
    world_size: int
    device: str  # this rank's device: "cuda:3" | "cpu"
    device_map: dict[str, str] | None  # from_pretrained's; None: load where it is
    base_dtype: torch.dtype  # frozen, non-quantized weights
    compute_dtype: torch.dtype  # bitsandbytes k-bit matmuls
    mixed_precision: str  # Trainer autocast: "bf16" | "fp16" | "no"
    attn_implementation: str
    optim: str
    gradient_checkpointing_kwargs: dict[str, Any] | None
    ddp_find_unused_parameters: bool
    tf32: bool
    eval_batch_size: int

    def rank_devices(self) -> list[str]:
        """The device of every rank: each rank loads onto its own, never all onto cuda:0."""
        if self.machine.accelerator == "cpu":
            return ["cpu"] * self.world_size
        return [f"cuda:{r % self.machine.count}" for r in range(self.world_size)]

    def summary(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value).removeprefix("torch.") if f.name.endswith("dtype") else value
        out["machine"] = self.machine.name
        out["rank_devices"] = self.rank_devices()
        return out


def describe(name: str) -> Machine:
    """A named machine for planning: `cpu`, `t4`, `a10g`, `l4`, `a100-40`, `a100-80`, `h100`,
    each optionally `xN` (`h100x8`)."""
    match = re.fullmatch(r"([a-z0-9-]+?)(?:x(\d+))?", name.lower())
    kind, count = (match.group(1), int(match.group(2) or 1)) if match else (name, 1)
    if kind == "cpu":
        return Machine(name, "cpu", 1, memory_gb=24, bf16=False)
    if kind not in GPUS or count < 1:
        known = ", ".join(["cpu", *GPUS])
        raise UserError(f"--machine: unknown machine '{name}' (known: {known}, each with xN)")
    spec = GPUS[kind]
    return Machine(
        name,
        "cuda",
        count,
        memory_gb=spec["memory_gb"],
        bf16=spec["bf16"],
        tf32=spec["tf32"],
        peak_tflops=spec["peak_tflops"],
        flash_attention=False,  # planning assumes the default install: sdpa
    )


def device_count() -> int:
    """Visible CUDA devices, without creating a CUDA context (the launcher's parent asks this)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def detect() -> Machine:
    """This machine, as this rank sees it."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    count = device_count()
    if count == 0:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
        return Machine("cpu", "cpu", 1, memory_gb=memory, bf16=_cpu_has_bf16())
    props = torch.cuda.get_device_properties(local_rank % count)
    capability = props.major + props.minor / 10
    named = next((k for k, v in GPUS.items() if v["capability"] == capability), None)
    peak = GPUS[named]["peak_tflops"] if named else None
    return Machine(
        f"{props.name} x{count}",
        "cuda",
        count,
        memory_gb=props.total_memory / GB,
        bf16=torch.cuda.is_bf16_supported(),
        tf32=props.major >= 8,
        peak_tflops=peak,
        flash_attention=props.major >= 8 and importlib.util.find_spec("flash_attn") is not None,
        local_rank=local_rank,
    )


def world_size(p: Params, machine_devices: int) -> int:
    """train.num_processes, where `auto` is every visible GPU (one process on a CPU)."""
    if p.train.num_processes == "auto":
        return max(machine_devices, 1)
    return p.train.num_processes


def _mixed_precision(p: Params, m: Machine, kbit: bool) -> str:
    asked = p.train.mixed_precision
    if asked == "bf16" and m.accelerator == "cuda" and not m.bf16:
        raise UserError(f"train.mixed_precision: bf16, but {m.name} has no bf16; use auto or fp16")
    if asked != "auto":
        return asked
    if m.accelerator == "cpu":
        # Measured on an AVX512-BF16 CPU (bench: precision): MiniLM LoRA 1.26-1.46x faster under
        # bf16 autocast at the same dev accuracy. bitsandbytes' bf16 CPU kernels are ~20x slower.
        return "bf16" if m.bf16 and not kbit else "no"
    if m.bf16:
        return "bf16"
    # No bf16 (T4): fp16 autocast, but never over a k-bit base (it overflows on long sequences).
    return "no" if kbit else "fp16"


def _compute_dtype(p: Params, m: Machine) -> torch.dtype:
    asked = p.quant.compute_dtype
    if asked == "bfloat16" and m.accelerator == "cuda" and not m.bf16:
        raise UserError(f"quant.compute_dtype: bfloat16, but {m.name} has no bf16; use auto")
    if asked != "auto":
        return DTYPES[asked]
    # bf16 where the GPU has it; fp32 elsewhere: bitsandbytes' bf16 CPU kernels are ~20x slower,
    # and fp16 k-bit compute without autocast overflows.
    return torch.bfloat16 if m.accelerator == "cuda" and m.bf16 else torch.float32


def _base_dtype(m: Machine, kbit: bool, compute: torch.dtype) -> torch.dtype:
    if kbit:
        return compute  # embeddings, norms, head: in the dtype the k-bit layers compute in
    if m.accelerator == "cpu":
        return torch.float32
    return torch.bfloat16 if m.bf16 else torch.float16


def eval_batch_size(p: Params, m: Machine, vocab_size: int, compute: torch.dtype) -> int:
    """evaluate.batch_size, lowered until one batch's logits fit a share of the device."""
    if p.task == "seq_cls":
        return p.evaluate.batch_size  # a few logits per row
    per_elem = torch.finfo(compute).bits // 8 + 4 + 4  # logits, fp32 upcast, log-softmax
    per_row = p.tokenize.max_length * vocab_size * per_elem
    fits = int(m.memory_gb * GB * EVAL_LOGITS_SHARE // per_row)
    return max(1, min(p.evaluate.batch_size, fits))


def resolve(p: Params, config: Any, machine: Machine | None = None) -> Runtime:
    """(params, model config, machine) → every device-dependent choice for this rank."""
    m = machine or detect()
    kbit = p.quant.bits != "none"
    world = world_size(p, m.count if m.accelerator == "cuda" else 0)
    if m.accelerator == "cuda" and world > m.count * _nodes(p):
        raise UserError(f"train.num_processes: {world} processes but {m.name} has {m.count} GPUs")
    mixed = _mixed_precision(p, m, kbit)
    # A full-precision base computes in its own dtype; a k-bit one in bitsandbytes' compute dtype.
    base = _base_dtype(m, kbit, _compute_dtype(p, m))
    compute = _compute_dtype(p, m) if kbit else base
    device = f"cuda:{m.local_rank % m.count}" if m.accelerator == "cuda" else "cpu"
    flash = m.flash_attention and base in (torch.bfloat16, torch.float16)
    return Runtime(
        machine=m,
        world_size=world,
        device=device,
        # A k-bit base must be placed by from_pretrained; on a GPU every base is, straight onto
        # this rank's device (no full-size copy in host memory per rank).
        device_map={"": device} if kbit or m.accelerator == "cuda" else None,
        base_dtype=base,
        compute_dtype=compute,
        mixed_precision=mixed,
        attn_implementation="flash_attention_2" if flash else "sdpa",
        optim="adamw_torch_fused",  # one fused kernel per step; torch has it for CPU and CUDA
        # Non-reentrant: reentrant checkpointing marks LoRA weights ready twice under DDP.
        gradient_checkpointing_kwargs=(
            {"use_reentrant": False} if p.train.gradient_checkpointing else None
        ),
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient every step
        tf32=m.accelerator == "cuda" and m.tf32,
        eval_batch_size=eval_batch_size(p, m, getattr(config, "vocab_size", 0) or 0, compute),
    )


def _nodes(p: Params) -> int:
    return 2 if p.train.distributed == "multinode-ddp" else 1


def merge_runtime(rt: Runtime, checkpoint_dtype: torch.dtype, model_bytes: float) -> Runtime:
    """Where and in what precision the merge runs: the base's own dtype (a bf16 checkpoint
    stays bf16), on this rank's GPU when the model fits in half of it, else on the CPU."""
    fits_gpu = rt.machine.accelerator == "cuda" and model_bytes < rt.machine.memory_gb * GB / 2
    device = rt.device if fits_gpu else "cpu"
    return dataclasses.replace(
        rt, device=device, device_map={"": device}, base_dtype=checkpoint_dtype
    )


def peak_memory_gb(rt: Runtime) -> float | None:
    """Peak allocated memory on this rank's GPU since the start (None on a CPU)."""
    if rt.machine.accelerator != "cuda":
        return None
    return torch.cuda.max_memory_allocated(rt.device) / GB


def autocast(rt: Runtime) -> torch.autocast:
    """The autocast training used, for evaluation and the merge check: same numerics."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(rt.mixed_precision)
    return torch.autocast(rt.machine.accelerator, dtype=dtype, enabled=dtype is not None)


def throughput(rt: Runtime, rows: Any, samples: int, seconds: float, params: int) -> dict[str, Any]:
    """Wall-clock figures (they differ run to run: timing.json, not metrics.json).

    tokens/s counts real (non-pad) tokens, from the set's mean row length. MFU takes 4·N FLOPs
    per token for N base params (forward 2N, backward 2N for activation gradients only: the base
    is frozen; LoRA's own FLOPs and attention's are left out, recomputation is not counted).
    """
    tokens = samples * sum(rows["length"][:]) / max(len(rows), 1)
    out: dict[str, Any] = {
        "train_seconds": round(seconds, 2),
        "samples_per_second": round(samples / seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "device": rt.machine.name,
    }
    peak = rt.machine.peak_tflops
    if peak:
        out["mfu"] = round(4 * params * tokens / seconds / (peak * 1e12 * rt.world_size), 4)
    memory = peak_memory_gb(rt)
    if memory is not None:
        out["peak_memory_gb_per_device"] = round(memory, 2)
    return out
