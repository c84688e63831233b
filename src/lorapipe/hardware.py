"""What a machine is known or measured to do: GPU datasheets, and whether bf16 pays on this CPU.

`describe(name)` builds a named machine for planning; runtime.detect() the one in hand.

Whether bf16 autocast pays on a CPU is measured once per machine, then read from a cache: CPU
flags do not answer it (AVX512-BF16 without AMX is slower than fp32 on some Intel Xeons, faster on
some AMD EPYCs). A LoRA-sized linear layer (forward and the input gradient of a frozen fp32
weight, as training runs it) is timed under bf16 autocast against fp32, sides interleaved, the
best of a few rounds each, on one thread and in CPU time: the ratio is a property of the core's
kernels, and neither a descheduled sibling thread nor preemption on a loaded machine enters it.
The result is cached per CPU model, flags and torch version in $XDG_CACHE_HOME/lorapipe
(~/.cache/lorapipe); LORAPIPE_CPU_BF16_SPEEDUP=<ratio> replaces the measurement.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lorapipe.config import UserError
from lorapipe.io import read_json, write_json

MARGIN = 1.15  # bf16 must be at least this much faster than fp32 to be chosen
# (tokens, in, out): a MiniLM-size feed-forward layer, up and down projections.
SHAPES = ((128, 384, 1536), (128, 1536, 384))
MIN_ROUNDS, MAX_ROUNDS = 3, 40  # the best of each side: a loaded machine only slows rounds down
BUDGET_S = 0.25  # seconds, after which no round starts once MIN_ROUNDS are in
ENV = "LORAPIPE_CPU_BF16_SPEEDUP"


@dataclass(frozen=True)
class Bf16Speed:
    """bf16 autocast against fp32 on this CPU's linear layers."""

    fp32_gflops: float
    bf16_gflops: float
    speedup: float  # bf16 / fp32 throughput
    seconds: float  # wall time of the measurement
    source: str  # "measured now", "cached in <file>", or the environment variable

    @property
    def faster(self) -> bool:
        return self.speedup >= MARGIN

    def reason(self) -> str:
        verdict = "bf16" if self.faster else f"fp32 (bf16 needs >= {MARGIN}x)"
        return (
            f"measured bf16 {self.speedup:.2f}x fp32 autocast matmul on this CPU "
            f"({self.bf16_gflops:g} vs {self.fp32_gflops:g} GFLOP/s, {self.source}) → {verdict}"
        )


def machine_key() -> str:
    """CPU model + a hash of its flags + the torch version: what decides the kernels."""
    model, flags = platform.machine(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == platform.machine():
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = " ".join(sorted(value.split()))
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{model} | flags {digest} | torch {torch.__version__}"


def _step(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, bf16: bool) -> float:
    """One layer's forward and input gradient (the frozen weight needs no gradient of its own)."""
    start = time.thread_time()  # CPU time: a preempted step is not counted as a slow one
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        F.linear(x, w), torch.mm(grad, w)
    return time.thread_time() - start


def measure() -> Bf16Speed:
    """Time the shapes under both precisions now (a fraction of a second)."""
    start, threads = time.perf_counter(), torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)  # never the global RNG: training's seeds stay put
    tensors = [
        tuple(torch.randn(*shape, generator=gen) for shape in ((t, k), (n, k), (t, n)))
        for t, k, n in SHAPES
    ]
    best = {side: [float("inf")] * len(SHAPES) for side in (False, True)}
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for x, w, grad in tensors:  # warm-up: kernels picked, buffers allocated
                _step(x, w, grad, False), _step(x, w, grad, True)
            for done in range(MAX_ROUNDS):
                if done >= MIN_ROUNDS and time.perf_counter() - start > BUDGET_S:
                    break
                for i, (x, w, grad) in enumerate(tensors):
                    for bf16 in (False, True):
                        best[bf16][i] = min(best[bf16][i], _step(x, w, grad, bf16))
    finally:
        torch.set_num_threads(threads)
    flops = sum(2 * 2 * t * k * n for t, k, n in SHAPES)  # forward + input gradient
    fp32, bf16 = flops / sum(best[False]) / 1e9, flops / sum(best[True]) / 1e9
    return Bf16Speed(
        round(fp32, 1),
        round(bf16, 1),
        round(bf16 / fp32, 2),
        round(time.perf_counter() - start, 3),
        "measured now",
    )


def cpu_has_bf16() -> bool:
    """Native bf16 instructions (not whether they pay: `bf16_speed` measures that)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorapipe"


def bf16_speed() -> Bf16Speed:
    """This CPU's figure: the environment's, else the cache's, else measured and cached."""
    if os.environ.get(ENV):
        try:
            speedup = float(os.environ[ENV])
        except ValueError:
            raise UserError(
                f"{ENV}: expected a ratio such as 1.4, got {os.environ[ENV]!r}"
            ) from None
        return Bf16Speed(0.0, 0.0, speedup, 0.0, f"set by {ENV}")
    key = machine_key()
    path = cache_dir() / f"cpu-bf16-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Ranks started together: the first measures, the others wait and read its answer.
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return _cached_or_measured(path, key)
    except OSError:  # no writable cache: measure for this process only
        return measure()


def _cached_or_measured(path: Path, key: str) -> Bf16Speed:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = read_json(path)  # the file's name is the key's hash; its content names the key
        fields = {k: data[k] for k in ("fp32_gflops", "bf16_gflops", "speedup", "seconds")}
        return Bf16Speed(**fields, source=f"cached in {path}")
    result = measure()
    write_json(path, {"key": key, **{k: v for k, v in vars(result).items() if k != "source"}})
    return result


# Dense (no sparsity) 16-bit tensor TFLOP/s with fp32 accumulation from the vendor's datasheet
# (bf16; fp16 where there is no bf16), by torch.cuda's device name; the first match wins.
PEAKS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756), (r"H[12]00 NVL", 835), (r"H100|H200|H800", 989), (r"B200", 2250),
    (r"A100", 312), (r"A10G", 70), (r"\bA10\b", 125), (r"\bA40\b", 149.7),
    (r"RTX A6000", 154.8), (r"RTX 6000 Ada", 364.2), (r"L40S", 362), (r"\bL40\b", 181),
    (r"\bL4\b", 121), (r"RTX 4090", 165.2), (r"RTX 3090", 71), (r"\bT4\b", 65),
    (r"V100", 125),
)  # fmt: skip
# The machines `--machine` names: memory (GB), native bf16, torch.cuda's name, capability.
GPUS: dict[str, dict[str, Any]] = {
    "t4": {"memory_gb": 16, "bf16": False, "name": "Tesla T4", "capability": 7.5},
    "a10g": {"memory_gb": 24, "bf16": True, "name": "NVIDIA A10G", "capability": 8.6},
    "l4": {"memory_gb": 24, "bf16": True, "name": "NVIDIA L4", "capability": 8.9},
    "l40s": {"memory_gb": 48, "bf16": True, "name": "NVIDIA L40S", "capability": 8.9},
    "a100-40": {"memory_gb": 40, "bf16": True, "name": "NVIDIA A100-SXM4-40GB", "capability": 8.0},
    "a100-80": {"memory_gb": 80, "bf16": True, "name": "NVIDIA A100-SXM4-80GB", "capability": 8.0},
    "h100": {"memory_gb": 80, "bf16": True, "name": "NVIDIA H100 80GB HBM3", "capability": 9.0},
    "h100-pcie": {"memory_gb": 80, "bf16": True, "name": "NVIDIA H100 PCIe", "capability": 9.0},
    "h200": {"memory_gb": 141, "bf16": True, "name": "NVIDIA H200", "capability": 9.0},
}
MAX_DEVICES = 16  # per node, for --machine NAMExN


@dataclass(frozen=True)
class Machine:
    """A machine as the resolver sees it: what kind of device, how many, how big, what math."""

    name: str
    accelerator: str  # "cuda" | "cpu"
    count: int  # devices of that kind (1 for a CPU)
    memory_gb: float  # per device (host memory for a CPU)
    bf16: bool  # native bf16 math (GPU: sm80+; CPU: AVX512-BF16 / AMX instructions)
    tf32: bool = False
    peak_tflops: float | None = None  # dense 16-bit, per device: the MFU denominator
    peak_source: str = ""  # where peak_tflops comes from (a datasheet, or a guess)
    flash_attention: bool = False  # flash-attn installed and the GPU is sm80+
    attention_note: str = "planning assumes the default install"  # why (not) flash-attn
    cpu_bf16: Bf16Speed | None = None  # CPU: bf16 autocast measured against fp32
    local_rank: int = 0
    gpu: str = ""  # this rank's device name, as torch.cuda gives it
    capability: float | None = None  # its compute capability (8.0: sm80)


def peak_tflops(device_name: str, capability: float) -> tuple[float | None, str]:
    """The datasheet peak for this device name, else a guess from a named GPU of its capability."""
    for pattern, peak in PEAKS:
        if re.search(pattern, device_name):
            return peak, f"datasheet: {device_name}"
    kin = next((k for k, v in GPUS.items() if v["capability"] == capability), None)
    if kin is None:
        return None, f"unknown device {device_name!r}: no MFU"
    guess, _ = peak_tflops(GPUS[kin]["name"], capability)
    return guess, f"guess from capability {capability} ({kin}): {device_name!r} not in the table"


def describe(name: str) -> Machine:
    """A named machine for planning: `cpu` or one of GPUS, each optionally `xN` (`h100x8`)."""
    match = re.fullmatch(r"([a-z0-9-]+?)(?:x(\d+))?", name.lower())
    kind, count = (match.group(1), int(match.group(2) or 1)) if match else (name, 1)
    if kind != "cpu" and kind not in GPUS:
        known = ", ".join(["cpu", *GPUS])
        raise UserError(f"--machine: unknown machine '{name}' (known: {known}, each with xN)")
    if not 1 <= count <= (1 if kind == "cpu" else MAX_DEVICES):
        most = "a CPU is one device" if kind == "cpu" else f"N from 1 to {MAX_DEVICES} per node"
        raise UserError(f"--machine: {name} asks for {count} devices ({most})")
    if kind == "cpu":
        return Machine(name, "cpu", 1, memory_gb=24, bf16=False)
    spec = GPUS[kind]
    peak, source = peak_tflops(spec["name"], spec["capability"])
    return Machine(
        name,
        "cuda",
        count,
        memory_gb=spec["memory_gb"],
        bf16=spec["bf16"],
        tf32=spec["capability"] >= 8,
        peak_tflops=peak,
        peak_source=source,
        flash_attention=False,  # planning assumes the default install: sdpa
        gpu=spec["name"],
        capability=spec["capability"],
    )
