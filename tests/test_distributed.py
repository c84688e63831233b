"""Two ranks through `accelerate launch` (DDP over gloo on this CPU): they match one process,
stop with the stage, and two such runs side by side take their own rendezvous ports."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lorapipe.model_sources import resolve_model
from tests.conftest import MINILM, ROOT, make_project, run


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory):
    # Dropout draws differ per rank; without it, identical batches give identical updates.
    # The real MiniLM, not a random tiny BERT, whose logits sit at a saddle (loss = ln 2) where
    # float rounding alone sends runs apart.
    out = tmp_path_factory.mktemp("minilm-no-dropout") / "model"
    shutil.copytree(resolve_model(MINILM), out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def train_run(path, model, processes: int, batch_size: int, **extra):
    project = make_project(
        path,
        {
            **extra,
            "model.name": str(model),
            "data.max_train_rows": 64,
            "data.max_eval_rows": 16,
            "lora.dropout": 0.0,
            "train.mixed_precision": "no",  # fp32: the ranks' sum must match to 1e-4
            "train.batch_size": batch_size,
            "train.num_processes": processes,
            # rank r takes rows r, r+2, ...: the two ranks' batches together are the 1-rank batch
            "train.sampling": "sequential",
            "train.logging_steps": 1,
            "train.epochs": 1,
            "train.eval_strategy": "no",
            "train.save_steps": 4,
        },
    )
    run(["python", "stages/tokenize_data.py"], cwd=project)
    return project, run(["python", "stages/train.py"], cwd=project)


def curve(project, name):
    lines = (project / "reports/train/plots/metrics" / name).read_text().splitlines()[1:]
    return [tuple(float(x) for x in line.split("\t")) for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        {},
        # 4-bit + gradient checkpointing + 2 ranks died at the first backward ("marked as ready
        # twice"): reentrant checkpointing with find_unused_parameters=True.
        {"quant.bits": 4, "train.gradient_checkpointing": True},
        {"quant.bits": 8},
    ],
    ids=["fp32", "4bit-checkpointing", "8bit"],
)
def test_two_ranks_match_one_with_the_same_effective_batch(tmp_path, no_dropout_bert, extra):
    two, proc = train_run(tmp_path / "two", no_dropout_bert, 2, 4, **extra)
    one, _ = train_run(tmp_path / "one", no_dropout_bert, 1, 8, **extra)
    log = proc.stdout + proc.stderr
    assert "rank 0/2" in log and "rank 1/2" in log  # both ranks ran
    metrics = json.loads((two / "reports/train/metrics.json").read_text())
    assert (metrics["effective_batch_size"], metrics["devices"]) == (8, 2)
    # only rank 0 wrote: one adapter, no leftovers of a second writer
    assert sorted(p.name for p in (two / "models").iterdir()) == ["adapter", "checkpoint"]
    loss_two, loss_one = curve(two, "loss.tsv"), curve(one, "loss.tsv")
    assert [s for s, _ in loss_two] == [s for s, _ in loss_one] and len(loss_one) == 8
    for (_, a), (_, b) in zip(loss_two, loss_one, strict=True):
        assert abs(a - b) < 2e-3 * b
    # gradients were averaged over both ranks: the two runs end at the same adapter
    a = load_file(two / "models/adapter/adapter_model.safetensors")
    b = load_file(one / "models/adapter/adapter_model.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)


def stage_env(slots_dir, port_base: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LORAPIPE_SLOTS_DIR": str(slots_dir)}
    env["LORAPIPE_PORT_BASE"] = str(port_base)
    return env


def project_processes(project) -> list[psutil.Process]:
    """Every live process started from this project copy (the stage, launcher and ranks)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            if proc.info["cwd"] == str(project) or str(project) in " ".join(proc.info["cmdline"]):
                found.append(proc)
    return found


def files(project) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in project.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_sigterm_stops_every_rank(tmp_path, tiny_bert):
    project = make_project(
        tmp_path / "p",
        {
            "model.name": str(tiny_bert),
            "data.max_train_rows": 64,
            "data.max_eval_rows": 16,
            "train.batch_size": 4,
            "train.num_processes": 2,
            "train.max_steps": 100000,  # far longer than the test waits
            "train.logging_steps": 1,
            "train.eval_strategy": "no",
            "train.save_steps": 2,
        },
    )
    run(["python", "stages/tokenize_data.py"], cwd=project)
    log = (tmp_path / "stage.log").open("w")
    stage = subprocess.Popen(
        [sys.executable, "stages/train.py"],
        cwd=project,
        env=stage_env(tmp_path / "slots", 29650),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    while not list((project / "models/.work").glob("*/checkpoint-*")):
        assert stage.poll() is None, (tmp_path / "stage.log").read_text()
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.5)
    ranks = [p for p in project_processes(project) if p.pid != stage.pid]
    assert len(ranks) >= 3  # the launcher and both ranks
    stage.send_signal(signal.SIGTERM)
    start = time.monotonic()
    assert stage.wait(60) == 130
    print(f"stage and ranks stopped {time.monotonic() - start:.1f} s after SIGTERM")
    _, alive = psutil.wait_procs(ranks, timeout=5)
    assert not alive and not project_processes(project), (tmp_path / "stage.log").read_text()
    before = files(project)
    time.sleep(2)
    assert files(project) == before  # nothing writes once the stage has returned
    text = (tmp_path / "stage.log").read_text()
    assert "interrupted: the newest complete checkpoint" in text


@pytest.mark.slow
def test_two_parallel_runs_take_their_own_ports(tmp_path, no_dropout_bert):
    projects, stages = [], []
    for name in ("a", "b"):
        project = make_project(
            tmp_path / name,
            {
                "model.name": str(no_dropout_bert),
                "data.max_train_rows": 32,
                "data.max_eval_rows": 16,
                "lora.dropout": 0.0,
                "train.mixed_precision": "no",
                "train.batch_size": 4,
                "train.num_processes": 2,
                "train.sampling": "sequential",
                "train.epochs": 1,
                "train.eval_strategy": "no",
            },
        )
        run(["python", "stages/tokenize_data.py"], cwd=project)
        projects.append(project)
    env = stage_env(tmp_path / "slots", 29660)
    for project in projects:  # both at once, sharing one lock folder as dvc queue workers do
        cmd = [sys.executable, "stages/train.py"]
        stages.append(
            subprocess.Popen(
                cmd,
                cwd=project,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
                stderr=subprocess.STDOUT,
            )
        )
    logs = [s.communicate(timeout=600)[0] for s in stages]
    assert [s.returncode for s in stages] == [0, 0], "\n".join(logs)
    ports = sorted(int(re.search(r"rendezvous port (\d+)", log).group(1)) for log in logs)
    assert ports == [29660, 29661]
    for project in projects:
        metrics = json.loads((project / "reports/train/metrics.json").read_text())
        assert (metrics["effective_batch_size"], metrics["devices"]) == (8, 2)
    # the same experiment twice: the same adapter, neither run disturbed by the other
    a, b = (load_file(p / "models/adapter/adapter_model.safetensors") for p in projects)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
