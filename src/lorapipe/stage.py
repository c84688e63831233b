"""How a stage script runs: params validated before torch loads, every user error one line.

Exit codes: 2 for a user error (one `error:` line per problem), 130 for Ctrl-C (one line
saying how to resume). The stage scripts import their library inside `main`, so a params
error costs the time of pydantic and PyYAML, not of torch, transformers and peft.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from lorapipe.config import Params, UserError, load_params
from lorapipe.launch import launched

RESUME = "run `dvc repro` again to resume"


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"WARNING: {text}" if record.levelno >= logging.WARNING else text


def quiet_libraries(p: Params | None = None) -> None:
    """Third-party noise off before those libraries load; our own lines and warnings stay.

    Set TRANSFORMERS_VERBOSITY=warning (or info) to see transformers' messages again.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Load reports ("classifier.weight MISSING" is the new head we train) and deprecations.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_Format("%(message)s"))
        logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("lorapipe").setLevel(logging.INFO)
    # bitsandbytes warns at import (which transformers and peft trigger) that an optional CPU
    # kernel is missing; that matters only to a quantized run.
    quantized = p is not None and p.quant.bits != "none"
    logging.getLogger("bitsandbytes").setLevel(logging.WARNING if quantized else logging.ERROR)


def exp_run_hint() -> str | None:
    """What to do about a params error in `dvc exp run -S`, which has already written the value."""
    if "DVC_EXP_NAME" not in os.environ:
        return None
    root = os.environ.get("DVC_ROOT")
    if root and Path(root).resolve() != Path.cwd().resolve():  # --temp / --queue: a copy
        return "your params.yaml is unchanged (this experiment ran in a copy); fix the -S value"
    return (
        "`dvc exp run -S` has already written this value into params.yaml: fix it there or "
        "undo it with `git checkout params.yaml` (`dvc exp run --temp` leaves params.yaml alone)"
    )


def restore_tracked(paths: Sequence[str]) -> None:
    """Put back the committed version of git-tracked outs after a failed or interrupted run.

    DVC deletes a stage's outs before running it, `cache: false` reports included, which
    `dvc checkout` cannot bring back; a failed run would leave them missing. Partial files of
    the failed run go (a resumed run replays its logged history from the checkpoint).
    """
    for path in paths:
        target = Path(path)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        with contextlib.suppress(OSError):  # no git: nothing committed to restore
            subprocess.run(
                ["git", "restore", "--source=HEAD", "--worktree", "--", path],
                capture_output=True,
                check=False,
            )


def fail(exc: UserError) -> None:
    for line in str(exc).splitlines():
        print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(
    main: Callable[[Params], object],
    params_file: str = "params.yaml",
    tracked_outs: Sequence[str] = (),
    interrupted: str = f"nothing was written; {RESUME}",
) -> None:
    """Validate params, then `main(params)`; `tracked_outs` are restored if it fails.

    A rank (or a launched child) restores nothing: the stage that launched it does, once every
    child is gone, so no two processes delete and restore the same folder at once. A rank also
    keeps SIGTERM's default, death at once: a rank blocked in a collective whose peer has gone
    would not reach Python's handler until the launcher's SIGKILL, seconds later.
    """
    if launched():
        tracked_outs = ()
    else:
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up as Ctrl-C does
    quiet_libraries()
    try:
        try:
            p = load_params(os.environ.get("LORAPIPE_PARAMS", params_file))
        except UserError as exc:
            hint = exp_run_hint()
            raise UserError(f"{exc}\n{hint}" if hint else str(exc)) from None
        quiet_libraries(p)
        main(p)
    except UserError as exc:
        restore_tracked(tracked_outs)
        fail(exc)
    except KeyboardInterrupt:
        restore_tracked(tracked_outs)
        print(f"interrupted: {interrupted}", file=sys.stderr)
        sys.exit(130)
    except Exception:
        restore_tracked(tracked_outs)
        raise
