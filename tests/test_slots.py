"""Slots: which devices and port a train run takes, and the child it runs in."""

import subprocess
import sys
import textwrap

import pytest

from lorapipe import slots
from lorapipe.config import UserError, load_params
from lorapipe.launch import child_env, command
from tests.conftest import ROOT

EIGHT = [str(i) for i in range(8)]


@pytest.mark.parametrize(
    ("visible", "held", "ports", "asked", "per_run", "copy", "expected"),
    [
        # the workspace, nothing held: auto is every GPU, on accelerate's port
        (EIGHT, set(), set(), "auto", None, False, (tuple(EIGHT), 29500)),
        # a queued copy: one GPU each, so -j 8 runs eight experiments side by side
        (EIGHT, set(), set(), "auto", None, True, (("0",), 29500)),
        (EIGHT, {"0", "1"}, {29500, 29501}, "auto", None, True, (("2",), 29502)),
        # the workspace while a queue holds three: only the five free ones
        (EIGHT, {"0", "3", "5"}, {29500}, "auto", None, False, (("1", "2", "4", "6", "7"), 29501)),
        # LORAPIPE_DEVICES_PER_RUN=2: pairs, in copies and the workspace alike
        (EIGHT, {"0", "1"}, {29500}, "auto", 2, True, (("2", "3"), 29501)),
        (EIGHT, set(), set(), "auto", 2, False, (("0", "1"), 29500)),
        # a number asks for that many free GPUs, a port past the held ones
        (EIGHT, {"1"}, {29500, 29502}, 3, None, False, (("0", "2", "3"), 29501)),
        # not enough free: wait (None), whatever the policy
        (EIGHT, set(EIGHT), set(), "auto", None, True, None),
        (EIGHT, set(EIGHT[:6]), set(), 3, None, False, None),
        (EIGHT, set(), set(range(29500, 29500 + slots.PORTS)), "auto", None, False, None),
        # CUDA_VISIBLE_DEVICES=2,5 on the host: its entries are the device names
        (["2", "5"], {"2"}, set(), "auto", None, False, (("5",), 29500)),
        # a CPU: no devices, only a port (gloo rendezvous)
        ([], set(), {29500}, 2, None, False, ((), 29501)),
        ([], set(), set(), "auto", None, True, ((), 29500)),
    ],
)
def test_choose(visible, held, ports, asked, per_run, copy, expected):
    assert slots.choose(visible, held, ports, asked, per_run, copy) == expected


def test_more_processes_than_gpus_is_one_line():
    with pytest.raises(UserError, match=r"train\.num_processes: 9 processes but 8 visible GPUs"):
        slots.choose(EIGHT, set(), set(), 9)


@pytest.mark.parametrize(
    ("env", "count", "expected"),
    [(None, 0, []), (None, 3, ["0", "1", "2"]), ("4,6", 2, ["4", "6"]), ("", 0, [])],
)
def test_visible_devices(monkeypatch, env, count, expected):
    if env is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert slots.visible_devices(count) == expected


def test_world_size():
    assert slots.world_size(("3", "4"), "auto") == 2
    assert slots.world_size((), "auto") == 1
    assert slots.world_size((), 2) == 2


HOLDER = """
import sys, time
from lorapipe import slots
slot = slots.acquire({visible!r}, {request!r})
print(",".join(slot.devices), slot.port, flush=True)
time.sleep(60)
"""


def test_a_second_process_takes_only_what_the_first_leaves(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPIPE_SLOTS_DIR", str(tmp_path))
    monkeypatch.setenv("LORAPIPE_PORT_BASE", "29600")
    for key in ("DVC_EXP_NAME", "DVC_ROOT", "LORAPIPE_DEVICES_PER_RUN"):
        monkeypatch.delenv(key, raising=False)
    code = textwrap.dedent(HOLDER.format(visible=["0", "1", "2"], request=2))
    env = {"PYTHONPATH": str(ROOT / "src"), "LORAPIPE_SLOTS_DIR": str(tmp_path)}
    env["LORAPIPE_PORT_BASE"] = "29600"
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().split() == ["0,1", "29600"]
        slot = slots.acquire(["0", "1", "2"], "auto")  # the workspace: every free GPU
        assert (slot.devices, slot.port) == (("2",), 29601)
        for handle in slot.locks:
            handle.close()
        holder.kill()
        holder.wait()
        slot = slots.acquire(["0", "1", "2"], "auto")  # the kernel dropped the dead holder's locks
        assert (slot.devices, slot.port) == (("0", "1", "2"), 29600)
    finally:
        holder.kill()
        holder.wait()


def test_devices_per_run_must_be_a_positive_integer(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPIPE_SLOTS_DIR", str(tmp_path))
    monkeypatch.setenv("LORAPIPE_DEVICES_PER_RUN", "two")
    with pytest.raises(UserError, match="LORAPIPE_DEVICES_PER_RUN: 'two'"):
        slots.acquire(EIGHT, "auto")


@pytest.mark.parametrize(
    ("devices", "world", "visible", "child"),
    [
        ((), 1, [], None),  # CPU, one process: in this process
        (("0",), 1, ["0"], None),  # the only GPU: in this process
        (("3",), 1, EIGHT, "script"),  # one GPU of eight: a child that sees only GPU 3
        (("2", "5"), 2, EIGHT, "accelerate"),
        ((), 2, [], "accelerate"),  # 2 ranks over gloo
    ],
)
def test_command(devices, world, visible, child):
    slot = slots.Slot(devices, 29503, world)
    cmd = command(load_params(ROOT / "params.yaml"), "stages/train.py", slot, visible)
    if child is None:
        assert cmd is None
        return
    assert cmd[-1] == "stages/train.py"
    if child == "script":
        assert cmd == [sys.executable, "stages/train.py"]
    else:
        assert cmd[cmd.index("--num_processes") + 1] == str(world)
        assert cmd[cmd.index("--main_process_port") + 1] == "29503"
    env = child_env(slot)
    assert (
        env.get("CUDA_VISIBLE_DEVICES") == (",".join(devices) if devices else None) or not devices
    )
    assert env["LORAPIPE_LAUNCHED"] == "1"
