"""io's promise: an output folder or file is the previous one or the complete new one, never half.

The block is interrupted inside `atomic_dir` itself: by an exception and by SIGKILL.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lorapipe.io import atomic_dir, read_json, write_json, write_text_atomic
from tests.conftest import ROOT


def previous(path):
    path.mkdir(parents=True)
    (path / "weights.bin").write_text("old weights")
    (path / "only-old.txt").write_text("old")


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_success_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "models" / "adapter"
    previous(out)
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp != out and tmp.name.startswith(".adapter.tmp-")
        (tmp / "weights.bin").write_text("new weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x")
        assert (out / "weights.bin").read_text() == "old weights"  # untouched until the end
    assert listing(out) == ["sub", "sub/x", "weights.bin"]  # nothing of the old folder stays
    assert (out / "weights.bin").read_text() == "new weights"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["adapter"]  # no temporary left


def test_a_file_at_the_path_is_replaced_by_the_folder(tmp_path):
    out = tmp_path / "merged"
    out.write_text("a stray file")
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert listing(out) == ["config.json"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_exception_in_the_block_keeps_the_previous_folder(tmp_path, error):
    out = tmp_path / "adapter"
    previous(out)
    with pytest.raises(error), atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_text("half")
        raise error("disk full")
    assert listing(out) == ["only-old.txt", "weights.bin"]
    assert (out / "weights.bin").read_text() == "old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the temporary folder is gone


def test_an_exception_with_no_previous_folder_leaves_no_folder(tmp_path):
    out = tmp_path / "reports" / "deeper" / "merged"  # parents made as needed
    with pytest.raises(ValueError), atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        raise ValueError("refused")
    assert not out.exists() and list(out.parent.iterdir()) == []


KILLED_WRITER = """
import sys, time
from lorapipe.io import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "weights.bin").write_text("half of the new weights")
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_sigkill_in_the_block_keeps_the_previous_folder(tmp_path):
    out = tmp_path / "models" / "adapter"
    previous(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    tmp = proc.stdout.readline().strip()  # the block has started writing
    assert tmp, "the writer died before its block"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert listing(out) == ["only-old.txt", "weights.bin"]
    assert (out / "weights.bin").read_text() == "old weights"
    # What SIGKILL leaves: one hidden sibling, which nothing reads (DVC tracks models/adapter,
    # a rerun writes a new temporary folder). The next run replaces `out` cleanly.
    siblings = sorted(p.name for p in out.parent.iterdir())
    assert siblings == sorted(["adapter", os.path.basename(tmp)])
    assert siblings[0].startswith(".adapter.tmp-")
    with atomic_dir(out) as new:
        assert str(new) != tmp
        (new / "weights.bin").write_text("new weights")
    assert listing(out) == ["weights.bin"]


def test_write_text_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "reports" / "merge.json"
    write_json(path, {"passed": True})
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "half \udc80 a lone surrogate cannot be encoded")
    assert read_json(path) == {"passed": True}
    assert [p.name for p in path.parent.iterdir()] == ["merge.json"]


def test_write_json_is_sorted_indented_and_newline_terminated(tmp_path):
    path = tmp_path / "new" / "deeper" / "m.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    assert read_json(path) == {"a": [1, 2], "b": 1}
    write_text_atomic(path, "é")
    assert path.read_bytes() == "é".encode()
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_write_text_atomic_writes_a_hidden_sibling_then_renames_it(tmp_path, monkeypatch):
    """A rename within one folder is atomic; a temporary elsewhere could cross file systems."""
    renames = []
    replace = os.replace

    def recording_replace(src, dst):
        renames.append((Path(src), Path(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    path = tmp_path / "reports" / "merge.json"
    write_json(path, {"passed": True})
    [(src, dst)] = renames
    assert dst == path and src.parent == path.parent
    assert src.name.startswith(".merge.json.tmp-")
