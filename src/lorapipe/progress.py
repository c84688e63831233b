"""What a person watching a run sees: bars in a terminal, plain lines in logs, a summary line.

A bar only when stderr is a terminal (`dvc repro` passes its terminal to the stage); in CI and
log files one line per logging step instead, as carriage-return bar updates are noise there.
LORAPIPE_PROGRESS=bars|lines overrides the detection. Nothing here writes to a file, so no
progress output can reach metrics or git-tracked reports. Importing it switches the libraries'
own bars off when not in a terminal. Light (tqdm, psutil): the stages import it first.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import psutil
from tqdm import tqdm


def interactive() -> bool:
    mode = os.environ.get("LORAPIPE_PROGRESS", "")
    return mode == "bars" if mode in ("bars", "lines") else sys.stderr.isatty()


def quiet_libraries() -> None:
    """Library bars (datasets' map, weight loading, downloads) only in a terminal.

    Through the environment, which the libraries read when imported (so this module is light
    and imported first by the stages), and directly for those a process has already imported.
    """
    if interactive():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers follows the hub
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


quiet_libraries()


def clock(seconds: float) -> str:
    seconds = round(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def step_line(
    step: int, max_steps: int, logs: dict[str, Any], elapsed: float | None = None, done: int = 0
) -> str:
    """One line per logging step, e.g.
    `step 10/471 (2%) | loss 0.6931 | learning_rate 0.0009 | epoch 0.06 | 0:12 elapsed, ~9:03 left`

    `done`: steps run by this process (a resumed run starts counting at its checkpoint).
    """
    figures = " | ".join(
        f"{k} {_number(v)}"
        for k, v in logs.items()
        if k != "total_flos" and not k.endswith(("runtime", "per_second"))
    )
    line = f"step {step}/{max_steps} ({100 * step // max(max_steps, 1)}%) | {figures}"
    if elapsed is None:
        return line
    left = elapsed / done * (max_steps - step) if done > 0 and step < max_steps else None
    return f"{line} | {clock(elapsed)} elapsed" + (f", ~{clock(left)} left" if left else "")


def bar(items: Iterable[Any], desc: str, unit: str = "it", total: int | None = None) -> Iterable:
    """A tqdm bar over `items` in a terminal; the items alone otherwise."""
    if not interactive():
        return items
    return tqdm(items, desc=desc, unit=unit, total=total, dynamic_ncols=True, leave=False)


class Phases:
    """Announce each phase of a long stage: a bar in a terminal, a line (with the time) otherwise.

    `phase = Phases("merge", 4)`, then `phase("saving")` as each begins and `phase.close()`.
    """

    def __init__(self, stage: str, total: int) -> None:
        self.stage, self.total, self.count = stage, total, 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=stage, leave=False) if interactive() else None
        quiet_libraries()

    def __call__(self, name: str) -> None:
        self.count += 1
        if self.bar is None:
            at = clock(time.perf_counter() - self.start)
            print(f"{self.stage} {self.count}/{self.total}: {name} (at {at})", flush=True)
            return
        self.bar.update(0 if self.count == 1 else 1)
        self.bar.set_description(f"{self.stage}: {name}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def seconds_since_start() -> float:
    """Since this process started, imports included: what the person waited for."""
    return time.time() - psutil.Process().create_time()


def summary(stage: str, wrote: Sequence[str], headline: str, seconds: float | None = None) -> str:
    """The one line each stage prints at its end: `<stage>: wrote A, B | headline | 12.3 s`."""
    seconds = seconds_since_start() if seconds is None else seconds
    return f"{stage}: wrote {', '.join(wrote)} | {headline} | {seconds:.1f} s"
