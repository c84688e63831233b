"""Recipes: params files under recipes/, each a published setup, applied onto params.yaml.

A recipe holds only what differs from the schema's defaults; `apply` writes the complete
params (every key, so `dvc exp run -S key=value` can set any of them) and never overwrites
uncommitted edits to params.yaml silently.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from lorapipe.config import Params, UserError, parse_params, read_yaml

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


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


def apply_recipe(name: str, target: Path, force: bool = False) -> Params:
    p = recipe_params(name)
    if target.exists() and _uncommitted(target):
        if not force:
            raise UserError(
                f"{target}: has uncommitted edits; commit them first, or pass --force "
                f"(the old file is kept as {target.name}.bak)"
            )
        shutil.copy2(target, target.with_name(target.name + ".bak"))
    data: dict[str, Any] = p.model_dump()
    header = (
        f"# recipe: {name} — {list_recipes()[name]}\n"
        f"# Written by `lorapipe recipe apply {name}`; edit freely, every key is here.\n"
    )
    target.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return p
