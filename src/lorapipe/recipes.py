"""Recipes: params files under recipes/, each a published setup, applied onto params.yaml.

A recipe holds only what differs from the schema's defaults; `apply` writes the complete
params (every key, so `dvc exp run -S key=value` can set any of them, each with its
description) and never overwrites uncommitted edits to params.yaml silently. The shipped
params.yaml is DEFAULT_RECIPE applied.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from lorapipe.config import Params, UserError, parse_params, read_yaml
from lorapipe.params_file import render

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
DEFAULT_RECIPE = "offline-sst2-minilm"


def _path(name: str) -> Path:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(list_recipes()))
        raise UserError(f"recipe '{name}' not found in {RECIPES_DIR} (known: {known})")
    return path


def list_recipes() -> dict[str, str]:
    """{name: the first comment line of the file}."""
    out = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        out[path.stem] = first.lstrip("# ").strip()
    return out


def recipe_params(name: str) -> Params:
    path = _path(name)
    return parse_params(read_yaml(path), str(path.relative_to(RECIPES_DIR.parent)))


def _uncommitted(path: Path) -> bool:
    proc = subprocess.run(
        ["git", "status", "--porcelain", "--", path.name],
        cwd=path.parent,
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _header(name: str) -> str:
    return (
        f"# recipe: {name} — {list_recipes()[name]}\n"
        f"# Written by `lorapipe recipe apply {name}`; edit freely, every key is here.\n"
        "# Each key's meaning is the comment above it; `lorapipe params explain KEY` says more.\n"
    )


def recipe_text(name: str) -> str:
    """The complete params file `apply` writes for a recipe."""
    return render(recipe_params(name), _header(name))


def apply_recipe(name: str, target: Path, force: bool = False) -> Params:
    p = recipe_params(name)
    if target.exists() and _uncommitted(target):
        if not force:
            raise UserError(
                f"{target}: has uncommitted edits; commit them first, or pass --force "
                f"(the old file is kept as {target.name}.bak)"
            )
        shutil.copy2(target, target.with_name(target.name + ".bak"))
    target.write_text(render(p, _header(name)), encoding="utf-8")
    return p
