"""Pruning in the train stage of a `lorapipe search` trial.

With its pruner on, the search worker sets train.search_trial (<study>-<number>) and, for
`dvc exp run`, LORAPIPE_STORAGE and LORAPIPE_PRUNER. Without them `pruning_callbacks()` is
empty and training is unchanged. The trial's name is a param, not an environment variable, so
DVC's run-cache keys a pruned result by its trial: no later run with the same other params
(a study without pruning, a plain `dvc repro`) gets the stopped run's adapter.

With them, each in-training eval metric is reported to the trial; when the study's median
pruner says so, training stops, the checkpoint of that step is saved (the later stages run on
the adapter so far) and the trial records PRUNED_ATTR, so the worker marks it PRUNED.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from transformers import TrainerCallback

from lorapipe.search import ENV_PRUNER, ENV_STORAGE, PRUNED_ATTR, open_storage

log = logging.getLogger(__name__)


class PruningCallback(TrainerCallback):
    """Report `metric` (a Trainer eval key, e.g. eval_accuracy) at each eval; stop if pruned."""

    def __init__(self, trial: Any, metric: str, warmup_evals: int) -> None:
        self.trial, self.metric, self.warmup_evals = trial, metric, warmup_evals
        self.evals = 0

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any
    ) -> Any:
        value = (metrics or {}).get(self.metric)
        if value is None or not state.is_world_process_zero:
            return control
        self.trial.report(float(value), state.global_step)
        self.evals += 1
        if self.evals >= self.warmup_evals and self.trial.should_prune():
            log.info("pruned at step %d: %s = %.4g", state.global_step, self.metric, value)
            self.trial.set_user_attr(PRUNED_ATTR, state.global_step)
            control.should_training_stop = True
            control.should_save = True  # the stage copies checkpoint-<last step>
        return control


def pruning_callbacks(search_trial: str | None) -> list[TrainerCallback]:
    """[PruningCallback] inside a search trial run by one process; [] otherwise."""
    env = os.environ
    if not (search_trial and env.get(ENV_STORAGE) and env.get(ENV_PRUNER)):
        return []
    if int(env.get("WORLD_SIZE", "1")) > 1:  # ranks would stop at different steps
        log.warning("search: pruning is off with several processes")
        return []
    import optuna

    name, _, number = search_trial.rpartition("-")
    config = json.loads(env[ENV_PRUNER])
    storage = open_storage(env[ENV_STORAGE])
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=config["startup_trials"]),
    )
    study_id = storage.get_study_id_from_name(name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(number))
    trial = optuna.trial.Trial(study, trial_id)
    return [PruningCallback(trial, config["metric"], config["warmup_evals"])]
