"""A stage's code deps in dvc.yaml are exactly its import closure: a code edit never leaves a
metric stale, and no stage reruns for code it never runs."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, dvc, make_project

PACKAGE = ROOT / "src" / "lorapipe"
# Files a module reads through its own path (`Path(__file__)...`): deps of every stage importing it.
READS = {
    "plan.py": ["src/lorapipe/model_configs"],
    "launch.py": ["configs/accelerate"],
    "recipes.py": ["recipes"],
}


def _imports(path: Path) -> set[str]:
    """The lorapipe modules `path` imports at any depth (stage scripts import inside main),
    leaving out `if TYPE_CHECKING:` blocks, which never run."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in node.body
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from lorapipe import progress` names modules; `from lorapipe.x import f` module x
            lone = node.module == "lorapipe"
            names = [f"lorapipe.{a.name}" for a in node.names] if lone else [node.module]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("lorapipe.")}
    return found


def closure(script: Path) -> set[str]:
    """The project files `script` runs: itself, every lorapipe module it reaches, their data."""
    seen: set[str] = set()
    todo = list(_imports(script))
    while todo:
        name = todo.pop()
        if name not in seen and (PACKAGE / f"{name}.py").is_file():
            seen.add(name)
            todo += _imports(PACKAGE / f"{name}.py")
    files = {"src/lorapipe/__init__.py"} | {f"src/lorapipe/{name}.py" for name in seen}
    return files | {data for name in seen for data in READS.get(f"{name}.py", [])}


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _script(stage: dict) -> str:
    return stage["cmd"].split()[-1]


def _expected(stage: dict) -> set[str]:
    return {_script(stage)} | closure(ROOT / _script(stage))


def test_every_module_reading_its_own_path_is_known():
    for module in PACKAGE.glob("*.py"):
        if "__file__" in module.read_text():
            assert module.name in READS, f"{module.name} reads files beside it: add them to READS"


@pytest.mark.parametrize("name", list(_stages()))
def test_code_deps_are_exactly_the_import_closure(name):
    stage = _stages()[name]
    listed = {d for d in stage["deps"] if d.startswith(("stages/", "src/", "configs/"))}
    expected = _expected(stage)
    assert listed == expected, (
        f"{name}: missing {sorted(expected - listed)}, extra {sorted(listed - expected)}"
    )


def test_closure_follows_imports_inside_functions_and_skips_type_checking(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lorapipe.cli\n"
        "def main():\n    from lorapipe import merge\n"
    )
    files = closure(script)
    assert {"src/lorapipe/merge.py", "src/lorapipe/tasks.py"} <= files  # tasks: through merge
    assert "src/lorapipe/cli.py" not in files


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """A project copy whose dvc.lock records every stage, its outs stand-ins (no training)."""
    path = make_project(tmp_path_factory.mktemp("deps"))
    for out in ("data/tokenized", "models/adapter", "models/checkpoint", "models/merged"):
        (path / out).mkdir(parents=True)
        (path / out / "stand-in").write_text(out)
    for out in ("reports/train/plots", "reports/figures"):
        (path / out).mkdir(parents=True)
        (path / out / "stand-in").write_text(out)
    for out in ("train/metrics.json", "train/timing.json", "eval.json", "merge.json"):
        (path / "reports" / out).write_text("{}")
    (path / "reports/samples.json").write_text("[]")
    (path / "reports/generations.jsonl").write_text("")
    dvc("commit", "--force", cwd=path)
    assert json.loads(dvc("status", "--json", cwd=path).stdout) == {}
    return path


@pytest.mark.parametrize("module", ["tasks", "modeling", "packing", "runtime", "io"])
def test_editing_a_module_flags_every_stage_that_runs_it(committed, module):
    target = committed / "src/lorapipe" / f"{module}.py"
    original = target.read_text()
    target.write_text(original + "\n# edited\n")
    try:
        flagged = set(json.loads(dvc("status", "--json", cwd=committed).stdout))
    finally:
        target.write_text(original)
    runs_it = {n for n, s in _stages().items() if f"src/lorapipe/{module}.py" in _expected(s)}
    assert runs_it and flagged == runs_it, f"{module}: flagged {flagged}, runs it {runs_it}"
