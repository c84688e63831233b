"""Sharing results: a DVC remote between two clones, link-type caching, portable adapters."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorapipe.config import UserError, load_params
from lorapipe.model_sources import resolve_model
from lorapipe.modeling import load_config, load_with_adapter
from lorapipe.runtime import resolve
from tests.conftest import MINILM, ROOT, dvc, make_project, run, set_params

# MiniLM from its package (a `pkg:` base, as the default), on a handful of rows: seconds.
TINY = {
    "model.name": MINILM,
    "data.max_train_rows": 32,
    "data.max_eval_rows": 16,
    "train.epochs": 1,
    "train.batch_size": 8,
    "train.save_steps": 4,
    "train.logging_steps": 2,
    "merge.probe_size": 4,
}


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True)


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


@pytest.fixture(scope="module")
def clones(tmp_path_factory):
    """Clone `a` ran the pipeline and pushed (outputs + run-cache); `b` cloned it and pulled."""
    root = tmp_path_factory.mktemp("sharing")
    a = make_project(root / "a", TINY)
    dvc("repro", cwd=a)
    dvc("remote", "add", "-d", "store", str(root / "remote"), cwd=a)
    git("add", "-A", cwd=a)
    git("commit", "-qm", "trained", cwd=a)
    # A result never committed: fewer rows tokenized, its data pushed from the workspace.
    # `--run-cache` sends only the run records, not data. (Only a stage whose outs are all
    # cached can come back this way: DVC pushes no `cache: false` out, so train, evaluate and
    # merge, which write git-tracked metrics, rerun; `dvc exp push` shares those.)
    set_params(a, {"data.max_train_rows": 24})
    assert ran(dvc("repro", "tokenize", cwd=a).stdout) == {"tokenize"}
    dvc("push", cwd=a)
    git("checkout", "--", ".", cwd=a)
    dvc("checkout", cwd=a)
    dvc("push", "--run-cache", cwd=a)

    subprocess.run(["git", "clone", "-q", str(a), str(root / "b")], check=True)
    b = root / "b"
    dvc("pull", "--run-cache", cwd=b)
    return a, b


def test_pulled_clone_reproduces_nothing_and_predicts_at_once(clones):
    a, b = clones
    assert json.loads(dvc("status", "--json", cwd=b).stdout) == {}
    assert ran(dvc("repro", cwd=b).stdout) == set()
    for name in ("models/adapter/adapter_model.safetensors", "reports/samples.json"):
        assert (b / name).read_bytes() == (a / name).read_bytes(), name
    proc = run(["python", "-m", "lorapipe.cli", "predict", "-"], cwd=b, input="a gem of a film\n")
    [line] = proc.stdout.splitlines()
    assert set(json.loads(line)) == {"text", "label", "probability"}


def test_run_cache_restores_a_result_that_was_never_committed(clones):
    _, b = clones
    set_params(b, {"data.max_train_rows": 24})
    out = dvc("repro", "--pull", "tokenize", cwd=b).stdout  # --pull: the data of a cached run
    assert ran(out) == set() and "Stage 'tokenize' is cached" in out, out
    git("checkout", "--", ".", cwd=b)
    dvc("checkout", cwd=b)


def test_outputs_are_linked_to_the_cache_not_copied(clones):
    # .dvc/config (copied into the project) asks for hardlinks: one inode for file and cache.
    _, b = clones
    weights = b / "models/merged/model.safetensors"
    assert weights.stat().st_nlink == 2
    cached = [f for f in (b / ".dvc/cache").rglob("*") if f.stat().st_ino == weights.stat().st_ino]
    assert len(cached) == 1


def test_adapter_records_the_portable_base(clones):
    a, _ = clones
    venv_path = resolve_model(MINILM)
    for folder in ("models/adapter", "models/checkpoint"):
        config = json.loads((a / folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == MINILM, folder
        for file in (a / folder).iterdir():  # nothing else names this machine's venv either
            assert venv_path.encode() not in file.read_bytes(), file


def load(p, adapter):
    """Base + adapter as evaluate and predict load them, on this machine's runtime."""
    return load_with_adapter(p, resolve(p, load_config(p)), adapter, pad_token_id=0)


def test_copied_adapter_loads_where_the_package_lives_elsewhere(clones, tmp_path, monkeypatch):
    """Another machine: another venv path. The adapter names `pkg:…`, resolved there."""
    a, _ = clones
    adapter = shutil.copytree(a / "models/adapter", tmp_path / "adapter")
    p = load_params(a / "params.yaml")
    here = load(p, adapter)
    elsewhere = shutil.copytree(resolve_model(MINILM), tmp_path / "other-venv/site-packages/m")
    monkeypatch.setattr("lorapipe.model_sources._package_path", lambda spec, field: elsewhere)
    there = load(p, adapter)
    assert there.base_model.model.name_or_path == str(elsewhere)
    ids = torch.tensor([[101, 2023, 3185, 2003, 2307, 102]])
    with torch.no_grad():
        torch.testing.assert_close(here(input_ids=ids).logits, there(input_ids=ids).logits)


def test_adapter_of_another_base_is_refused(clones, tiny_bert, tmp_path):
    a, _ = clones
    p = load_params(a / "params.yaml")
    other = p.model_copy(update={"model": p.model.model_copy(update={"name": str(tiny_bert)})})
    with pytest.raises(UserError, match=r"^model.name: '.*tiny-bert.*' is not the base .* was"):
        load(other, a / "models/adapter")
    # An adapter saved before names were portable records a folder of another machine: loads.
    legacy = shutil.copytree(a / "models/adapter", tmp_path / "legacy")
    config = json.loads((legacy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/home/someone/.venv/lib/site-packages/m/model"
    (legacy / "adapter_config.json").write_text(json.dumps(config))
    load(p, legacy)


SAVE_ADAPTER = """
import sys
from pathlib import Path
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification
from lorapipe.lora import make_portable
base = AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
model = get_peft_model(base, LoraConfig(target_modules=["query", "key", "value"]))
model.save_pretrained(sys.argv[2])
make_portable(Path(sys.argv[2]), "pkg:some/model")
"""


def test_the_same_adapter_is_the_same_bytes_in_every_process(tiny_bert, tmp_path):
    # PEFT saves target_modules from a set, in string-hash order: per process, unless sorted.
    saved = set()
    for seed in range(4):
        out = tmp_path / str(seed)
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": str(ROOT / "src")}
        subprocess.run(
            [sys.executable, "-c", SAVE_ADAPTER, str(tiny_bert), str(out)], env=env, check=True
        )
        saved.add((out / "adapter_config.json").read_bytes())
    assert len(saved) == 1
    assert json.loads(saved.pop())["target_modules"] == ["key", "query", "value"]
