"""Does bf16 autocast pay on this CPU? Measured once per machine, then read from a cache.

CPU flags do not answer it: AVX512-BF16 without AMX is slower than fp32 on some Intel Xeons and
faster on some AMD EPYCs. So a LoRA-sized linear layer (forward and the input gradient of a
frozen fp32 weight, as training runs it) is timed under bf16 autocast against fp32, sides
interleaved, the best of a few rounds each. One thread: the ratio is a property of the core's
kernels, and a single thread is not stalled by a descheduled sibling on a loaded machine.
The result is cached per CPU model, flags and torch version in
$XDG_CACHE_HOME/lorapipe (~/.cache/lorapipe); LORAPIPE_CPU_BF16_SPEEDUP=<ratio> skips it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorapipe"


def bf16_speed() -> Bf16Speed:
    """This CPU's figure: the environment's, else the cache's, else measured and cached."""
    if os.environ.get(ENV):
        try:
            speedup = float(os.environ[ENV])
        except ValueError:
            raise ValueError(
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
        data = read_json(path)
        if data["key"] == key:
            fields = {k: data[k] for k in ("fp32_gflops", "bf16_gflops", "speedup", "seconds")}
            return Bf16Speed(**fields, source=f"cached in {path}")
    result = measure()
    write_json(path, {"key": key, **{k: v for k, v in vars(result).items() if k != "source"}})
    return result
