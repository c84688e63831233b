"""Which GPUs and which rendezvous port one train run takes, so parallel runs never collide.

Every train stage on this machine (`dvc repro`, `dvc exp run`, each `dvc queue start -j N`
worker, whose copies live under .dvc/tmp/exps) takes a slot: a set of devices and a port, each
held by an exclusive `flock` on a file in one lock folder outside every copy
(`$LORAPIPE_SLOTS_DIR`, default /tmp/lorapipe-slots-<uid>). The kernel drops a lock when its
holder dies, SIGKILL included, so a crashed run never leaves a device taken.

Policy, for the devices CUDA_VISIBLE_DEVICES leaves visible:
- `train.num_processes: N` takes N devices that no other run holds; it waits while fewer are free.
- `auto` takes `$LORAPIPE_DEVICES_PER_RUN` devices when that is set; else one device in an
  experiment copy (`dvc exp run --queue`/`--temp`): `dvc queue start -j 8` on 8 GPUs runs
  8 one-GPU experiments side by side; else (the workspace) every free device, at least one.
- On a CPU there are no devices: only the port is taken (DDP over gloo needs one too).
Each slot's port is LORAPIPE_PORT_BASE (default 29500, accelerate's) plus the lowest index no
other run holds and no other program listens on.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from lorapipe.config import UserError

log = logging.getLogger(__name__)
PORTS = 64  # slot ports tried above the base
WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class Slot:
    devices: tuple[str, ...]  # CUDA_VISIBLE_DEVICES entries of this run ((): a CPU)
    port: int  # MASTER_PORT of this run's rendezvous
    world_size: int
    locks: tuple[IO[bytes], ...] = field(default=(), compare=False, repr=False)

    def fds(self) -> tuple[int, ...]:
        """The lock descriptors: the launched processes hold the slot as long as they live."""
        return tuple(f.fileno() for f in self.locks)


def lock_dir() -> Path:
    return Path(
        os.environ.get("LORAPIPE_SLOTS_DIR")
        or Path(tempfile.gettempdir()) / f"lorapipe-slots-{os.getuid()}"
    )


def in_experiment_copy() -> bool:
    """A queued or --temp experiment: dvc runs it in a copy and points DVC_ROOT at the project."""
    root = os.environ.get("DVC_ROOT")
    return (
        "DVC_EXP_NAME" in os.environ and bool(root) and Path(root).resolve() != Path.cwd().resolve()
    )


def wanted(
    visible: int, free: int, request: int | Literal["auto"], per_run: int | None, copy: bool
) -> int:
    """How many devices a run takes: the policy of the module docstring."""
    if visible == 0:
        return 0
    if request != "auto":
        if request > visible:
            raise UserError(f"train.num_processes: {request} processes but {visible} visible GPUs")
        return request
    if per_run is not None:
        return min(per_run, visible)
    return 1 if copy else max(free, 1)


def choose(
    visible: Sequence[str],
    held: set[str],
    held_ports: set[int],
    request: int | Literal["auto"],
    per_run: int | None = None,
    copy: bool = False,
    base: int = 29500,
) -> tuple[tuple[str, ...], int] | None:
    """(visible devices, what other runs hold, request) → (devices, port); None: wait."""
    free = [d for d in visible if d not in held]
    n = wanted(len(visible), len(free), request, per_run, copy)
    if n > len(free):
        return None
    port = next((base + i for i in range(PORTS) if base + i not in held_ports), None)
    if port is None:
        return None
    return tuple(free[:n]), port


def world_size(devices: Sequence[str], request: int | Literal["auto"]) -> int:
    """Processes: one per device of the slot; on a CPU the request (auto: one)."""
    if devices:
        return len(devices)
    return 1 if request == "auto" else request


def visible_devices(count: int) -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries of the `count` devices torch sees (all indices if unset)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [d.strip() for d in env.split(",") if d.strip()] if env is not None else []
    return names[:count] if env is not None else [str(i) for i in range(count)]


def _try_lock(path: Path) -> IO[bytes] | None:
    handle = path.open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _attempt(
    folder: Path,
    visible: Sequence[str],
    request: int | Literal["auto"],
    per_run: int | None,
    base: int,
) -> Slot | None:
    """One scan and take, under the folder's allocation lock (so two runs never pick alike)."""
    with (folder / "alloc.lock").open("ab") as alloc:
        fcntl.flock(alloc, fcntl.LOCK_EX)
        probes = {d: _try_lock(folder / f"cuda-{_safe(d)}.lock") for d in visible}
        held = {d for d, h in probes.items() if h is None}
        ports: dict[int, IO[bytes]] = {}
        held_ports: set[int] = set()
        for port in range(base, base + PORTS):
            handle = _try_lock(folder / f"port-{port}.lock")
            if handle is None or _port_busy(port):
                held_ports.add(port)
                if handle is not None:
                    handle.close()
                continue
            ports[port] = handle
            break
        picked = choose(visible, held, held_ports, request, per_run, in_experiment_copy(), base)
        keep = [probes[d] for d in picked[0]] + [ports[picked[1]]] if picked else []
        for handle in [*probes.values(), *ports.values()]:
            if handle is not None and handle not in keep:
                handle.close()
    if picked is None:
        return None
    devices, port = picked
    return Slot(devices, port, world_size(devices, request), tuple(keep))


def acquire(visible: Sequence[str], request: int | Literal["auto"]) -> Slot:
    """Take a slot, waiting while other runs hold the devices this one needs."""
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    per_run = os.environ.get("LORAPIPE_DEVICES_PER_RUN")
    if per_run is not None and not (per_run.isdigit() and int(per_run) > 0):
        raise UserError(f"LORAPIPE_DEVICES_PER_RUN: '{per_run}' is not a positive integer")
    base = int(os.environ.get("LORAPIPE_PORT_BASE", "29500"))
    said = False
    while (
        slot := _attempt(folder, visible, request, int(per_run) if per_run else None, base)
    ) is None:
        if not said:
            log.info("train: waiting for free GPUs: other runs hold them (locks in %s)", folder)
            said = True
        time.sleep(WAIT_SECONDS)
    return slot


@contextlib.contextmanager
def held(visible: Sequence[str], request: int | Literal["auto"]) -> Iterator[Slot]:
    """A slot for the duration of the block; the locks go when it ends."""
    slot = acquire(visible, request)
    try:
        yield slot
    finally:
        for handle in slot.locks:
            handle.close()
