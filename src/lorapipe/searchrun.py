"""The search workers and report: Optuna asks, `dvc exp run --temp` trains, the metric goes back.

Each trial is the experiment `<study>-<trial number>`; its log is .dvc/tmp/search/<name>.log.
A worker beats a heartbeat into its running trial's user attrs; a RUNNING trial whose heartbeat
stopped (its worker was killed) is marked failed when a worker starts, and does not count
towards the trial count, so running the same command again finishes the study.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorapipe.search import (
    ENV_PRUNER,
    ENV_STORAGE,
    PRUNED_ATTR,
    Spec,
    distributions,
    error_line,
    open_storage,
    set_args,
)

HEARTBEAT_S = 20.0
STALE_S = 120.0  # a RUNNING trial silent this long lost its worker
# (returncode, stderr) of one `dvc exp run`: swapped for a fake in tests
Runner = Callable[[Path, list[str], dict[str, str], Path], tuple[int, str]]


RUNNING: set[subprocess.Popen[bytes]] = set()  # this process's `dvc exp run`s
STOPPING = threading.Event()  # Ctrl-C or SIGTERM: no new trial; running ones are interrupted


def dvc_runner(repo: Path, cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        if STOPPING.is_set():
            return 1, "error: interrupted before it started"
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
        RUNNING.add(proc)
        try:
            code = proc.wait()
        finally:
            RUNNING.discard(proc)
    return code, log.read_text(errors="replace")


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def load_study(spec: Spec) -> Any:
    import optuna

    sampler = (
        optuna.samplers.TPESampler(seed=spec.seed)
        if spec.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=spec.seed)
    )
    return optuna.create_study(
        study_name=spec.study,
        storage=open_storage(spec.storage),
        sampler=sampler,
        direction=spec.direction,
        load_if_exists=True,
    )


def sweep_stale(study: Any, now: float | None = None) -> list[int]:
    """Mark RUNNING trials whose heartbeat stopped as failed; their numbers."""
    from optuna.trial import TrialState

    now = time.time() if now is None else now
    swept = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.user_attrs.get("heartbeat", t.datetime_start.timestamp())
        if now - beat > STALE_S:
            study._storage.set_trial_user_attr(t._trial_id, "stale", True)
            study._storage.set_trial_user_attr(t._trial_id, "error", "worker stopped mid-trial")
            study.tell(t.number, state=TrialState.FAIL)
            swept.append(t.number)
    return swept


def counted(study: Any) -> int:
    """Trials that count towards the trial count: all but those whose worker was killed."""
    return sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("stale"))


def read_metric(repo: Path, name: str, objective: str) -> float | None:
    from lorapipe.compare import parse_exp_show

    proc = subprocess.run(
        ["dvc", "--wait-for-lock", "exp", "show", "--json"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    for row in parse_exp_show(json.loads(proc.stdout)):
        if row["name"] == name and row["state"] == "success":
            value = row["metrics"].get(objective)
            return None if value is None else float(value)
    return None


def run_trial(
    spec: Spec,
    study: Any,
    trial: Any,
    repo: Path,
    runner: Runner,
    metric: Callable[[Path, str, str], float | None],
) -> str:
    """One trial from ask to tell; the state it ended in (COMPLETE, PRUNED, FAIL)."""
    from optuna.trial import TrialState

    name = f"{spec.study}-{trial.number}"
    trial.set_user_attr("experiment", name)
    trial.set_user_attr("heartbeat", time.time())
    values = spec.fixed | trial.params
    if spec.pruner:  # a run the pruner may stop depends on the study: never reused for another
        values |= {"train.search_trial": name}
    cmd = [
        "dvc",
        "--wait-for-lock",
        "exp",
        "run",
        "--temp",
        "-n",
        name,
        *set_args(values),
        *spec.stages,
    ]
    env = os.environ | {ENV_STORAGE: spec.storage}
    if spec.pruner:
        env[ENV_PRUNER] = json.dumps(spec.pruner)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            trial.set_user_attr("heartbeat", time.time())

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        code, output = runner(repo, cmd, env, repo / ".dvc/tmp/search" / f"{name}.log")
        value = metric(repo, name, spec.objective) if code == 0 else None
    except Exception as exc:  # dvc missing, exp show failing: this trial fails, the search goes on
        code, output, value = 1, f"error: {type(exc).__name__}: {exc}", None
    finally:
        stop.set()
        beating.join()
    if value is None:
        error = error_line(output, code) if code else f"the experiment wrote no {spec.objective}"
        trial.set_user_attr("error", error)
        if STOPPING.is_set():  # interrupted: it does not count, a rerun runs another
            trial.set_user_attr("stale", True)
        study.tell(trial, state=TrialState.FAIL)
        print(f"{name}: failed: {error}", flush=True)
        return "FAIL"
    trial.set_user_attr("value", value)
    # Fresh from the storage (the train stage wrote it there; trial.user_attrs is a cache).
    attrs = study._storage.get_trial_user_attrs(trial._trial_id)
    if PRUNED_ATTR in attrs:  # the train stage stopped early: the value it reached
        study.tell(trial, state=TrialState.PRUNED)
        print(f"{name}: pruned at step {attrs[PRUNED_ATTR]}: {value:.4g}", flush=True)
        return "PRUNED"
    study.tell(trial, value)
    print(f"{name}: {spec.objective} = {value:.4g} {trial.params}", flush=True)
    return "COMPLETE"


def search(
    spec: Spec,
    repo: Path,
    jobs: int = 1,
    push: str | None = None,
    runner: Runner = dvc_runner,
    metric: Callable[[Path, str, str], float | None] = read_metric,
) -> Any:
    """`jobs` workers share the study until it holds spec.trials trials; the study."""
    study = load_study(spec)
    for number in sweep_stale(study):
        print(f"{spec.study}-{number}: its worker stopped; marked failed", flush=True)
    lock, space = threading.Lock(), distributions(spec)

    def work() -> None:
        while True:
            with lock:  # count and ask together: no overshoot among this machine's workers
                if STOPPING.is_set() or counted(study) >= spec.trials:
                    return
                trial = study.ask(space)
            state = run_trial(spec, study, trial, repo, runner, metric)
            if push and state != "FAIL":
                name = f"{spec.study}-{trial.number}"
                subprocess.run(["dvc", "exp", "push", push, name], cwd=repo, check=False)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(max(1, jobs))]
    STOPPING.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # `kill` stops the trials as Ctrl-C does
        # Started with SIGINT ignored (a shell's background job), the trials would inherit that
        # and ignore the SIGINT that stops them: a handled signal is reset to default on exec.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for w in workers:
        w.start()
    try:
        for w in workers:
            while w.is_alive():
                w.join(0.5)  # a short join: Ctrl-C reaches the main thread
    except KeyboardInterrupt:
        STOPPING.set()
        signalled: set[int] = set()
        while any(w.is_alive() for w in workers):  # each tells its trial FAIL, then ends
            for proc in [p for p in list(RUNNING) if p.pid not in signalled]:
                proc.send_signal(signal.SIGINT)  # as Ctrl-C: the stages keep their checkpoints
                signalled.add(proc.pid)
            time.sleep(0.2)
        raise
    return study


def report(spec: Spec, out_dir: Path) -> list[str]:
    """The best trial in lines; three plots under out_dir."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.trial import TrialState

    study = load_study(spec)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    lines = [
        f"study {spec.study}: {len(study.trials)} trials "
        + ", ".join(
            f"{len(study.get_trials(deepcopy=False, states=(s,)))} {s.name.lower()}"
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
        )
    ]
    if not done:
        return [*lines, "no completed trial yet"]
    best = study.best_trial
    lines += [
        f"best: trial {best.number} ({best.user_attrs.get('experiment')}) "
        f"{spec.objective} = {best.value:.6g} ({spec.direction})",
        *(f"  {k} = {v}" for k, v in best.params.items()),
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    vis = optuna.visualization.matplotlib
    plots = {"history": vis.plot_optimization_history, "slice": vis.plot_slice}
    if len(done) >= 2:
        plots["importances"] = vis.plot_param_importances
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for kind, draw in plots.items():
            axes = draw(study)
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            first.figure.savefig(out_dir / f"{kind}.png", dpi=100, bbox_inches="tight")
            matplotlib.pyplot.close(first.figure)
            lines.append(f"wrote {out_dir / f'{kind}.png'}")
    return lines
