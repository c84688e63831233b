"""Several processes through accelerate: the train stage re-runs itself under `accelerate launch`.

The stage script stays the same; params choose the engine (train.distributed names a config
in configs/accelerate/) and the process count (train.num_processes; auto: see lorapipe.slots).
The run's slot (lorapipe.slots) gives its devices, exported as CUDA_VISIBLE_DEVICES, and its
rendezvous port. A single process on a host with several visible GPUs also runs as a child that
sees only its one GPU: Trainer would otherwise count them all (n_gpu), multiply the batch and
wrap the model in nn.DataParallel; the parent has already initialised CUDA to count devices.

The children start in their own session: a SIGTERM or Ctrl-C of the stage is forwarded to the
launcher's process group as SIGTERM. torchrun's elastic launcher passes it on to every rank (each in
its own session too) and kills them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT; a launcher still
alive after GRACE_SECONDS is killed with every process it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from lorapipe.config import Params, UserError
from lorapipe.slots import Slot

log = logging.getLogger(__name__)
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
GUARD = "LORAPIPE_LAUNCHED"  # set for the ranks: a rank must never launch again
SHUTDOWN_SECONDS = 10  # torch elastic's wait for the ranks before it SIGKILLs them
GRACE_SECONDS = 20.0  # the stage's wait for the launcher before it SIGKILLs the whole tree


def launched() -> bool:
    return GUARD in os.environ or "WORLD_SIZE" in os.environ


def command(p: Params, script: str, slot: Slot, visible: Sequence[str]) -> list[str] | None:
    """The child this run needs (None: train in this process)."""
    if slot.world_size == 1:
        # One device of several: only a child started with CUDA_VISIBLE_DEVICES sees just it.
        return [sys.executable, script] if len(visible) > len(slot.devices) else None
    config = CONFIGS / f"{p.train.distributed}.yaml"
    if not config.is_file():
        raise UserError(f"train.distributed: no accelerate config {config}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--num_processes", str(slot.world_size)]
    if p.train.distributed != "multinode-ddp":  # every machine must use the config's port
        cmd += ["--main_process_port", str(slot.port)]
    # On a CPU-only machine the same launcher (torchrun underneath) runs DDP over gloo.
    return [*cmd, script]


def child_env(slot: Slot) -> dict[str, str]:
    env = {**os.environ, GUARD: "1"}
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_SECONDS))
    if slot.devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.devices)
    return env


def relaunch(p: Params, script: str, slot: Slot, visible: Sequence[str]) -> bool:
    """Run `script` in child processes when the slot needs them; True if it did."""
    if launched() or (cmd := command(p, script, slot, visible)) is None:
        return False
    where = f"GPUs {','.join(slot.devices)}" if slot.devices else "CPU"
    log.info("train: %d process(es) on %s, rendezvous port %d", slot.world_size, where, slot.port)
    code = supervise(cmd, child_env(slot), slot.fds())
    if code != 0:
        raise UserError(f"train: {Path(cmd[2]).name} exited with {code}")
    return True


def supervise(cmd: list[str], env: dict[str, str], fds: Sequence[int] = ()) -> int:
    """Run `cmd` in its own session; an interrupt stops it and everything it started."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, pass_fds=tuple(fds))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher's group, wait GRACE_SECONDS, then SIGKILL it and its descendants."""
    tree: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        tree = psutil.Process(proc.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    end = time.monotonic() + GRACE_SECONDS
    while proc.poll() is None and time.monotonic() < end:
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.wait(max(end - time.monotonic(), 0))  # a second Ctrl-C: keep waiting
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.wait()
