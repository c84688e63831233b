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
from dataclasses import dataclass
from typing import Any

import torch

from lorapipe.config import Params, UserError
from lorapipe.hardware import Machine, bf16_speed, cpu_has_bf16, peak_tflops
from lorapipe.hardware import describe as describe
from lorapipe.tasks import get_task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GB = 1e9

# Logits of one evaluation batch (compute dtype + the fp32 upcast + log-softmax) may take this
# share of a device: a 152k vocabulary at 64 x 512 tokens would otherwise hold ~50 GB.
EVAL_LOGITS_SHARE = 1 / 8


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
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)  # choice -> why

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


def device_count() -> int:
    """Visible CUDA devices, without creating a CUDA context (the launcher's parent asks this)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def detect() -> Machine:
    """This machine, as this rank sees it (a CPU's bf16 speed: measured once, then cached)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    count = device_count()
    if count == 0:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
        return Machine(
            "cpu",
            "cpu",
            1,
            memory_gb=memory,
            bf16=cpu_has_bf16(),
            attention_note="flash-attn is CUDA-only",
            cpu_bf16=bf16_speed(),
        )
    props = torch.cuda.get_device_properties(local_rank % count)
    capability = props.major + props.minor / 10
    peak, source = peak_tflops(props.name, capability)
    installed = importlib.util.find_spec("flash_attn") is not None
    if not installed:
        note = "flash_attn not installed"
    elif props.major < 8:
        note = f"flash-attn needs compute capability 8.0+, this GPU is {capability}"
    else:
        note = "flash_attn installed, compute capability 8.0+"
    return Machine(
        f"{props.name} x{count}",
        "cuda",
        count,
        memory_gb=props.total_memory / GB,
        # Native bf16 only: torch.cuda.is_bf16_supported() also counts sm75's emulation as bf16
        # (including_emulation=True by default), and asks the current device, not this rank's.
        bf16=props.major >= 8,
        tf32=props.major >= 8,
        peak_tflops=peak,
        peak_source=source,
        flash_attention=props.major >= 8 and installed,
        attention_note=note,
        local_rank=local_rank,
        gpu=props.name,
        capability=capability,
    )


def world_size(p: Params, machine_devices: int) -> int:
    """train.num_processes, where `auto` is every visible GPU (one process on a CPU)."""
    if p.train.num_processes == "auto":
        return max(machine_devices, 1)
    return p.train.num_processes


def _mixed_precision(p: Params, m: Machine, kbit: bool) -> tuple[str, str]:
    asked = p.train.mixed_precision
    if asked == "bf16" and m.accelerator == "cuda" and not m.bf16:
        raise UserError(f"train.mixed_precision: bf16, but {m.name} has no bf16; use auto or fp16")
    if asked != "auto":
        return asked, f"train.mixed_precision: {asked}"
    if m.accelerator == "cpu":
        if kbit:  # bitsandbytes' bf16 CPU kernels are ~20x slower
            return "no", "k-bit base on a CPU: bitsandbytes computes in fp32"
        if m.cpu_bf16 is None:
            return "no", "a CPU not measured here (a planned one): fp32"
        return ("bf16" if m.cpu_bf16.faster else "no"), m.cpu_bf16.reason()
    if m.bf16:
        return "bf16", f"{m.name} has native bf16"
    # No bf16 (T4): fp16 autocast, but never over a k-bit base (it overflows on long sequences).
    if kbit:
        return "no", "no bf16, and fp16 autocast over a k-bit base overflows"
    return "fp16", f"{m.name} has no native bf16: fp16"


def _compute_dtype(p: Params, m: Machine) -> torch.dtype:
    asked = p.quant.compute_dtype
    if asked == "bfloat16" and m.accelerator == "cuda" and not m.bf16:
        raise UserError(f"quant.compute_dtype: bfloat16, but {m.name} has no bf16; use auto")
    if asked != "auto":
        return DTYPES[asked]
    # bf16 where the GPU has it; fp32 elsewhere: bitsandbytes' bf16 CPU kernels are ~20x slower,
    # and fp16 k-bit compute without autocast overflows.
    return torch.bfloat16 if m.accelerator == "cuda" and m.bf16 else torch.float32


def _base_dtype(m: Machine, kbit: bool, compute: torch.dtype) -> tuple[torch.dtype, str]:
    if kbit:  # embeddings, norms, head: in the dtype the k-bit layers compute in
        return compute, "k-bit base: the rest in the compute dtype"
    if m.accelerator == "cpu":
        return torch.float32, "CPU: fp32 weights (autocast, if any, casts per op)"
    if m.bf16:
        return torch.bfloat16, "GPU with native bf16"
    return torch.float16, "GPU without bf16: fp16"


def eval_batch_size(p: Params, m: Machine, vocab_size: int, compute: torch.dtype) -> int:
    """evaluate.batch_size, lowered until one batch's logits fit a share of the device."""
    per_elem = torch.finfo(compute).bits // 8 + 4 + 4  # logits, fp32 upcast, log-softmax
    per_row = get_task(p.task).eval_logits(p, vocab_size) * per_elem
    fits = int(m.memory_gb * GB * EVAL_LOGITS_SHARE // per_row)
    return max(1, min(p.evaluate.batch_size, fits))


def _attention(m: Machine, dtype: torch.dtype, device: str) -> tuple[str, str]:
    """flash-attn where installed on an sm80+ GPU and the weights are 16-bit (it has no fp32)."""
    if not m.flash_attention or not device.startswith("cuda"):
        return "sdpa", m.attention_note
    if dtype not in (torch.bfloat16, torch.float16):
        return "sdpa", f"flash-attn computes in fp16/bf16 only, the weights are {_name(dtype)}"
    return "flash_attention_2", m.attention_note


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve(p: Params, config: Any, machine: Machine | None = None) -> Runtime:
    """(params, model config, machine) → every device-dependent choice for this rank, and why."""
    m = machine or detect()
    kbit = p.quant.bits != "none"
    world = world_size(p, m.count if m.accelerator == "cuda" else 0)
    if m.accelerator == "cuda" and world > m.count * _nodes(p):
        raise UserError(f"train.num_processes: {world} processes but {m.name} has {m.count} GPUs")
    mixed, why_mixed = _mixed_precision(p, m, kbit)
    # A full-precision base computes in its own dtype; a k-bit one in bitsandbytes' compute dtype.
    base, why_base = _base_dtype(m, kbit, _compute_dtype(p, m))
    compute = _compute_dtype(p, m) if kbit else base
    device = f"cuda:{m.local_rank % m.count}" if m.accelerator == "cuda" else "cpu"
    attention, why_attention = _attention(m, base, device)
    batch = eval_batch_size(p, m, getattr(config, "vocab_size", 0) or 0, compute)
    reasons = {
        "world_size": f"train.num_processes: {p.train.num_processes}",
        "device": "this rank's GPU (LOCAL_RANK)" if m.accelerator == "cuda" else "no CUDA device",
        "device_map": (
            "a k-bit base is placed by from_pretrained"
            if kbit
            else "straight onto this rank's GPU, no host copy"
            if m.accelerator == "cuda"
            else "loaded where it is (CPU)"
        ),
        "base_dtype": why_base,
        "compute_dtype": "bitsandbytes' compute dtype" if kbit else "the base's own dtype",
        "mixed_precision": why_mixed,
        "attn_implementation": why_attention,
        "optim": "one fused AdamW kernel per step (CPU and CUDA)",
        "tf32": "sm80+ tensor cores" if m.tf32 and m.accelerator == "cuda" else "no TF32 here",
        "eval_batch_size": (
            f"evaluate.batch_size {p.evaluate.batch_size}"
            if batch == p.evaluate.batch_size
            else f"lowered from {p.evaluate.batch_size}: one batch's logits fit "
            f"1/{round(1 / EVAL_LOGITS_SHARE)} of {m.memory_gb:.0f} GB"
        ),
    }
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
        attn_implementation=attention,
        optim="adamw_torch_fused",  # one fused kernel per step; torch has it for CPU and CUDA
        # Non-reentrant: reentrant checkpointing marks LoRA weights ready twice under DDP.
        gradient_checkpointing_kwargs=(
            {"use_reentrant": False} if p.train.gradient_checkpointing else None
        ),
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient every step
        tf32=m.accelerator == "cuda" and m.tf32,
        eval_batch_size=batch,
        reasons=reasons,
    )


def _nodes(p: Params) -> int:
    return 2 if p.train.distributed == "multinode-ddp" else 1


def merge_runtime(rt: Runtime, checkpoint_dtype: torch.dtype, model_bytes: float) -> Runtime:
    """Where and in what precision the merge runs: the base's own dtype (a bf16 checkpoint
    stays bf16), on this rank's GPU when the model fits in half of it, else on the CPU; sdpa
    unless flash-attn can run there in that dtype."""
    fits_gpu = rt.machine.accelerator == "cuda" and model_bytes < rt.machine.memory_gb * GB / 2
    device = rt.device if fits_gpu else "cpu"
    attention, why = _attention(rt.machine, checkpoint_dtype, device)
    return dataclasses.replace(
        rt,
        device=device,
        device_map={"": device},
        base_dtype=checkpoint_dtype,
        attn_implementation=attention,
        reasons=rt.reasons | {"base_dtype": "the checkpoint's dtype", "attn_implementation": why},
    )


def peak_memory_gb(rt: Runtime, reserved: bool = False) -> float | None:
    """Peak memory on this rank's GPU since the start: allocated by tensors, or reserved by the
    caching allocator (what the device really gave up). None on a CPU."""
    if rt.machine.accelerator != "cuda":
        return None
    peak = torch.cuda.max_memory_reserved if reserved else torch.cuda.max_memory_allocated
    return peak(rt.device) / GB


def autocast(rt: Runtime) -> torch.autocast:
    """The autocast training used, for evaluation and the merge check: same numerics."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(rt.mixed_precision)
    return torch.autocast(rt.machine.accelerator, dtype=dtype, enabled=dtype is not None)


def throughput(rt: Runtime, rows: Any, samples: int, seconds: float, params: int) -> dict[str, Any]:
    """Wall-clock figures (they differ run to run: timing.json, not metrics.json).

    tokens/s counts real (non-pad) tokens, from the set's mean row length. MFU takes 4·N FLOPs
    per token for N base params (forward 2N, backward 2N for activation gradients only: the base
    is frozen; LoRA's own FLOPs and attention's are left out, recomputation is not counted),
    over the peak the device's name gives (peak_source says which, or that it is a guess).
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
        out["peak_tflops"] = peak
    if rt.machine.peak_source:
        out["peak_source"] = rt.machine.peak_source
    for key, reserved in (
        ("peak_memory_gb_per_device", False),
        ("peak_reserved_gb_per_device", True),
    ):
        memory = peak_memory_gb(rt, reserved)
        if memory is not None:
            out[key] = round(memory, 2)
    return out
