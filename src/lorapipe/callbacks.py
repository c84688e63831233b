"""Trainer callbacks of the train stage: the non-finite-loss guard, step-aligned DVCLive curves,
progress (a bar in a terminal, one line per logging step otherwise), the last step always
logged, early stopping, and the training loop's own time and matmul params for the throughput
figures."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.integrations import DVCLiveCallback
from transformers.trainer_callback import ProgressCallback

from lorapipe import progress
from lorapipe.config import Params, UserError


class NonFiniteLoss(UserError):
    pass


class NonFiniteGuard(TrainerCallback):
    """Stops at the first non-finite loss, before the optimizer step can spread it to the weights.

    Each micro-step's loss is folded into a flag on the device (no host sync); the host reads
    the flag once per optimizer step, just before the step, so no non-finite weight is ever
    applied, checkpointed or saved.
    """

    def __init__(self) -> None:
        self.flag: torch.Tensor | None = None

    def observe(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self.flag = bad if self.flag is None else self.flag | bad

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        flag, self.flag = self.flag, None
        if flag is not None and bool(flag):  # the one sync per optimizer step
            raise NonFiniteLoss(
                f"train: loss became nan or inf at step {state.global_step + 1}; the last good "
                f"checkpoint is kept in {args.output_dir}; lower train.learning_rate or train in "
                "fp32 (train.mixed_precision: no)"
            )


class StepAlignedDVCLive(DVCLiveCallback):
    """transformers' DVCLive callback with DVCLive's step = the optimizer step.

    The stock callback counts log calls, so after a resume the curves would restart at 0; here a
    resumed run first replays the history saved in its checkpoint. It also skips copying
    TrainingArguments into DVCLive's params (params.yaml is the record).
    """

    def setup(self, args: Any, state: Any, model: Any) -> None:
        self._initialized = True

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.setup(args, state, None)
        if state.is_world_process_zero:
            for entry in state.log_history:
                logs = {k: v for k, v in entry.items() if k != "step"}
                self.live.step = entry["step"]
                super().on_log(args, state, control, logs=logs)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.live.step = state.global_step
            # Wall-clock figures differ run to run (they go to timing.json), and Trainer's
            # run-mean train_loss covers only the steps since a resume: the per-step curve stays.
            logs = {
                k: v
                for k, v in logs.items()
                if not k.endswith(("runtime", "per_second")) and k != "train_loss"
            }
        super().on_log(args, state, control, logs=logs, **kwargs)


class StepLines(TrainerCallback):
    """Not a terminal: one line per logging step (Trainer's PrinterCallback prints raw dicts)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            elapsed, done = time.perf_counter() - self.start, state.global_step - self.first_step
            line = progress.step_line(state.global_step, state.max_steps, logs, elapsed, done)
            print(line, flush=True)


class LossBar(ProgressCallback):
    """A terminal: Trainer's bar (steps, rate, time left) with the last loss on it; eval results
    print above it (the stock callback prints every log dict there)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not (state.is_world_process_zero and self.training_bar is not None and logs):
            return
        if "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        evals = {k: v for k, v in logs.items() if k.startswith("eval_") and "per_second" not in k}
        if evals:
            self.training_bar.write(progress.step_line(state.global_step, state.max_steps, evals))


class LogLastStep(TrainerCallback):
    """The last optimizer step is always logged: a run shorter than train.logging_steps (or one
    that ends between two logging steps) still has its final loss and learning rate."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_log = True


class LoopTimer(TrainerCallback):
    """The training loop's own seconds: train() from its first to its last callback, less the
    evaluations and checkpoint saves inside it.

    Trainer evaluates and then saves right after an optimizer step's end (or an epoch's): the
    time from that mark to on_evaluate, then to on_save, is theirs. The loss guard syncs with
    the device once per step, so at most one optimizer step's queued work is counted with them.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begin = self.mark = self.end = time.perf_counter()
        self.eval_seconds = self.save_seconds = 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.mark = time.perf_counter()

    on_epoch_end = on_step_end

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.eval_seconds, self.mark = self.eval_seconds + now - self.mark, now

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.save_seconds, self.mark = self.save_seconds + now - self.mark, now

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.end = time.perf_counter()

    @property
    def loop_seconds(self) -> float:
        return self.end - self.begin - self.eval_seconds - self.save_seconds


def early_stopping(p: Params) -> list[TrainerCallback]:
    """transformers' EarlyStoppingCallback with train.early_stopping_patience; [] when off.

    It reads the metric and its direction from TrainingArguments (checkpoints.saving).
    """
    patience = p.train.early_stopping_patience
    return [] if patience is None else [EarlyStoppingCallback(early_stopping_patience=patience)]


def matmul_params(model: nn.Module) -> int:
    """N of MFU's 4·N FLOPs per token: the frozen base's params (a 4-bit weight counted as
    PEFT counts it), less the embedding tables a lookup reads (no matmul). An input embedding
    tied to the output head stays: its weight is the head's matmul too. LoRA's own params are
    left out (trainable), and a head trained as a copy counts once (its frozen original).
    """
    trainable, total = model.get_nb_trainable_parameters()
    head = model.get_output_embeddings()
    tied = {id(head.weight)} if head is not None else set()
    lookups = {
        id(m.weight): m.weight.numel()
        for m in model.modules()
        if isinstance(m, nn.Embedding) and not m.weight.requires_grad and id(m.weight) not in tied
    }
    return total - trainable - sum(lookups.values())
