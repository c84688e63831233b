"""lorapipe search: search.yaml checks, params → -S args, trial states through a fake runner."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml

from lorapipe import cli, search, searchrun
from lorapipe.config import UserError

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)

GOOD = {
    "study": "t",
    "objective": "eval:accuracy",
    "trials": 6,
    "params": {
        "lora.r": {"choices": [4, 8, 16]},
        "lora.alpha": {"int": [8, 32]},
        "train.learning_rate": {"float": ["1e-5", 3.0e-3], "log": True},
    },
}


def write(tmp_path: Path, **changes: object) -> Path:
    space = {**GOOD, "storage": f"journal:{tmp_path}/s.journal", **changes}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_the_shipped_example_is_valid(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "search.yaml").read_text())
    raw["storage"] = f"journal:{tmp_path}/s.journal"
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(raw))
    spec = search.load_spec(tmp_path / "search.yaml", ROOT)
    assert spec.direction == "maximize"
    assert spec.pruner == {"metric": "eval_accuracy", "startup_trials": 2, "warmup_evals": 2}
    assert set(spec.params) == {"lora.r", "lora.alpha", "train.learning_rate"}


def test_directions_follow_the_metric_and_can_be_overridden(tmp_path: Path) -> None:
    assert search.load_spec(write(tmp_path), ROOT).direction == "maximize"
    spec = search.load_spec(write(tmp_path, objective="eval:tuned.loss"), ROOT)
    assert (spec.direction, spec.pruner["metric"]) == ("minimize", "eval_loss")
    with pytest.raises(UserError, match="direction: say maximize or minimize"):
        search.load_spec(write(tmp_path, objective="metrics:grad_norm"), ROOT)
    spec = search.load_spec(
        write(tmp_path, objective="metrics:grad_norm", direction="minimize"), ROOT
    )
    assert spec.direction == "minimize"


def test_task_metrics_match_the_tasks() -> None:
    from lorapipe.tasks import TASKS

    assert {name: task.metric for name, task in TASKS.items()} == search.TASK_METRIC


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"params": {"lora.rank": {"choices": [4]}}}, "params.lora.rank is not a key"),
        ({"set": {"train.epoch": 1}}, "params.train.epoch is not a key"),
        ({"params": {"lora.r": {"choices": []}}}, "choices must be a non-empty list"),
        ({"params": {"lora.r": {"int": [8, 8]}}}, "low (8) must be below high (8)"),
        ({"params": {"train.learning_rate": {"float": [0.0, 1.0], "log": True}}}, "low > 0"),
        ({"params": {"lora.r": {"int": [4, 8], "choices": [4]}}}, "give one of"),
        ({"objective": "eval:tuned.f1"}, "no stage writes eval:tuned.f1"),
        ({"objective": "scores:accuracy"}, "no stage writes scores:accuracy"),
        ({"storage": "sqlite:////no/such/folder/s.db"}, "storage: cannot open sqlite:////no/such"),
        ({"storage": "nosuchdb://host/x"}, "storage: cannot open nosuchdb://host/x"),
        ({"trials": 0}, "trials must be a whole number"),
        ({"study": "a b"}, "study: 'a b' must be"),
    ],
)
def test_bad_input_is_one_line_before_any_trial(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    changes: dict,
    message: str,
) -> None:
    path = write(tmp_path, **changes)
    with pytest.raises(UserError) as info:
        search.load_spec(path, ROOT)
    assert message in str(info.value) and "\n" not in str(info.value)
    monkeypatch.chdir(ROOT)
    ran: list[object] = []
    monkeypatch.setattr(searchrun, "search", lambda *a, **k: ran.append(a))
    with pytest.raises(SystemExit) as code:
        cli.main(["search", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1 and message in err[0] and not ran


def test_suggested_params_become_set_args_that_read_back(tmp_path: Path) -> None:
    spec = search.load_spec(write(tmp_path), ROOT)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask(search.distributions(spec))
        args = search.set_args(trial.params)
        assert args[::2] == ["-S"] * 3
        back = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args[1::2])}
        assert back == trial.params  # PyYAML reads 1.0e-05 as a float, not text
        assert back["lora.r"] in (4, 8, 16) and 8 <= back["lora.alpha"] <= 32
        assert 1e-5 <= back["train.learning_rate"] <= 3e-3
    (arg,) = search.set_args({"train.learning_rate": 1e-05})[1::2]
    assert yaml.safe_load(arg.split("=")[1]) == 1e-05  # not the text "1e-05"
    assert search.set_args({"lora.target_modules": ["query", "value"], "quant.bits": None}) == [
        *("-S", "lora.target_modules=[query, value]", "-S", "quant.bits=null"),
    ]


def _args(cmd: list[str]) -> dict[str, object]:
    pairs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-S"]
    return {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}


def fake_stage(repo: Path, cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    """r=4 fails as a stage would; others train with the real pruning callback, evals rising
    with alpha (a low alpha falls below the median and is pruned)."""
    from transformers.trainer_callback import TrainerControl, TrainerState

    values = _args(cmd)
    assert cmd[:6] == ["dvc", "--wait-for-lock", "exp", "run", "--temp", "-n"]
    assert values["train.epochs"] == 1  # set: applies to every trial
    if values["lora.r"] == 4:
        return 1, "Running stage 'train'\nerror: lora.r: boom\nERROR: failed to reproduce 'train'"
    # A run the pruner may stop is keyed by its trial: DVC's run-cache never hands it to another.
    assert values["train.search_trial"] == cmd[6]
    (callback,) = _callbacks(env, values["train.search_trial"])
    state, control = TrainerState(), TrainerControl()
    for step in (10, 20, 30, 40):
        state.global_step = step
        callback.on_evaluate(
            None, state, control, metrics={"eval_accuracy": values["lora.alpha"] / 40}
        )
        if control.should_training_stop:
            assert control.should_save
            break
    (repo / f"{cmd[6]}.json").write_text(json.dumps(values["lora.alpha"] / 40))
    return 0, ""


ENV_LOCK = threading.Lock()  # the study's workers are threads: one patches os.environ at a time


def _callbacks(env: dict[str, str], search_trial: str) -> list[object]:
    """The real callbacks as the train stage builds them, under the trial's LORAPIPE_* env.

    Serialised: two threads patching os.environ at once restore each other's values, and the
    variables then leak into later tests."""
    from lorapipe.trial import pruning_callbacks

    with ENV_LOCK, pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            if k.startswith("LORAPIPE_"):
                mp.setenv(k, v)
        return pruning_callbacks(search_trial)


def fake_metric(repo: Path, name: str, objective: str) -> float | None:
    path = repo / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def test_failed_and_pruned_trials_are_marked_and_the_search_goes_on(tmp_path: Path) -> None:
    path = write(tmp_path, set={"train.epochs": 1}, trials=10)
    spec = search.load_spec(path, ROOT)
    study = searchrun.search(spec, tmp_path, jobs=2, runner=fake_stage, metric=fake_metric)
    trials = study.get_trials()
    assert len(trials) == 10
    by_state = {s: [t for t in trials if t.state == s] for s in optuna.trial.TrialState}
    failed, pruned = (
        by_state[optuna.trial.TrialState.FAIL],
        by_state[optuna.trial.TrialState.PRUNED],
    )
    assert failed and all(t.params["lora.r"] == 4 for t in failed)
    assert all(t.user_attrs["error"] == "error: lora.r: boom" for t in failed)
    assert pruned, "no trial was pruned"
    for t in pruned:
        assert t.user_attrs[search.PRUNED_ATTR] >= 20  # after warmup_evals (2) evals
    for t in by_state[optuna.trial.TrialState.COMPLETE]:
        assert t.value == t.params["lora.alpha"] / 40
    assert {t.user_attrs["experiment"] for t in trials} == {f"t-{n}" for n in range(10)}
    lines = searchrun.report(spec, tmp_path / "out")
    best = study.best_trial
    assert f"best: trial {best.number} (t-{best.number})" in lines[1]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "history.png",
        "slice.png",
        "importances.png",
    }


def test_a_killed_workers_trial_is_failed_and_the_study_resumes(tmp_path: Path) -> None:
    spec = search.load_spec(write(tmp_path, trials=3, pruner=None), ROOT)
    study = searchrun.load_study(spec)
    alive, killed = study.ask(search.distributions(spec)), study.ask(search.distributions(spec))
    alive.set_user_attr("heartbeat", time.time())
    killed.set_user_attr("heartbeat", time.time() - 10 * searchrun.STALE_S)
    assert searchrun.sweep_stale(study) == [killed.number]
    study.tell(alive, 0.5)

    def run(repo: Path, cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
        assert "LORAPIPE_PRUNER" not in env  # pruner: null
        assert "train.search_trial" not in _args(cmd)  # unpruned runs share the run-cache
        return 0, ""

    study = searchrun.search(spec, tmp_path, runner=run, metric=lambda *a: 0.7)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[1].user_attrs["stale"] and searchrun.counted(study) == 3


STOP_SCRIPT = """
import sys
from pathlib import Path
from lorapipe import search, searchrun
spec = search.load_spec(Path(sys.argv[1]), Path(sys.argv[2]))
def run(repo, cmd, env, log):
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    return searchrun.dvc_runner(repo, sleep, env, log)
searchrun.search(spec, Path(sys.argv[3]), jobs=2, runner=run, metric=lambda *a: 0.5)
"""


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_sigterm_stops_the_running_trials_and_they_do_not_count(tmp_path: Path, sigint) -> None:
    """ignored: started as a shell's background job is (SIGINT ignored, which exec passes on);
    the trials must still stop on the SIGINT the search sends them."""
    import signal
    import subprocess
    import sys

    path = write(tmp_path, trials=4, pruner=None)
    handler = signal.SIG_IGN if sigint == "ignored" else signal.SIG_DFL
    proc = subprocess.Popen(
        [sys.executable, "-c", STOP_SCRIPT, str(path), str(ROOT), str(tmp_path)],
        preexec_fn=lambda: signal.signal(signal.SIGINT, handler),
    )
    journal = tmp_path / "s.journal"
    deadline = time.time() + 60
    while time.time() < deadline and (
        not journal.is_file() or journal.read_text().count('"op_code":4') < 2
    ):
        time.sleep(0.5)  # until both workers have asked (op 4: a trial created)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) != 0  # a trial sleeps 600 s: only the interrupt ends it
    study = searchrun.load_study(search.load_spec(path, ROOT))
    states = [(t.state.name, t.user_attrs.get("stale")) for t in study.get_trials()]
    assert states == [("FAIL", True), ("FAIL", True)] and searchrun.counted(study) == 0
