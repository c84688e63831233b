"""Several processes through accelerate: the train stage re-runs itself under `accelerate launch`.

The stage script stays the same; params choose the engine (train.distributed names a config
in configs/accelerate/) and the process count (train.num_processes; auto: one per GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lorapipe.config import Params, UserError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


GUARD = "LORAPIPE_LAUNCHED"  # set for the ranks: a rank must never launch again


def launched() -> bool:
    return GUARD in os.environ or "WORLD_SIZE" in os.environ


def relaunch(p: Params, script: str, world_size: int) -> bool:
    """Run `script` under accelerate when the runtime wants >1 process; True if it did."""
    if world_size == 1 or launched():
        return False
    config = CONFIGS / f"{p.train.distributed}.yaml"
    if not config.is_file():
        raise UserError(f"train.distributed: no accelerate config {config}")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        str(world_size),
    ]
    # On a CPU-only machine the same launcher (torchrun underneath) runs DDP over gloo.
    proc = subprocess.run([*cmd, script], check=False, env={**os.environ, GUARD: "1"})
    if proc.returncode != 0:
        raise UserError(f"train: accelerate launch exited with {proc.returncode}")
    return True
