"""The training path, top to bottom: data → model + LoRA → Trainer → adapter and checkpoint.

Resumable by design: Trainer checkpoints go to a work folder named by a fingerprint of exactly
what the train stage reads, which DVC does not delete before a rerun. A killed `dvc repro`
resumes from the newest complete checkpoint there; other params never resume into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from dvclive import Live
from peft.optimizers import create_loraplus_optimizer
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lorapipe import progress
from lorapipe.callbacks import (
    LogLastStep,
    LoopTimer,
    LossBar,
    NonFiniteGuard,
    StepAlignedDVCLive,
    StepLines,
    early_stopping,
    matmul_params,
)
from lorapipe.card import model_card, usage
from lorapipe.checkpoints import latest_checkpoint, saving
from lorapipe.config import MODEL_KEYS, QUANT_KEYS, Params, stage_params
from lorapipe.io import atomic_dir, write_json
from lorapipe.lora import RESIDUAL_INITS, make_portable, save_adapter
from lorapipe.modeling import (
    load_config,
    load_for_training,
    load_tokenizer,
    speed_switches,
    use_deterministic,
)
from lorapipe.provenance import certify
from lorapipe.runtime import Runtime, resolve, throughput
from lorapipe.tasks import get_task
from lorapipe.trial import pruning_callbacks

log = logging.getLogger(__name__)

# Exactly the params the train stage reads: dvc.yaml lists the same keys.
# Whole sections: lora, quant, train; the in-training eval runs batches of evaluate.batch_size.
TRAIN_KEYS = [*MODEL_KEYS, "lora", *QUANT_KEYS, "train", "evaluate.batch_size"]


class LengthBucketSampler(torch.utils.data.Sampler[int]):
    """Rows sorted by length and cut into batches; the batches come in random order.

    transformers' LengthGroupedSampler sorts only within mega-batches of at most 50 batches (and
    a quarter of the data): at batch 32, 27-6 % padding on 1,000-5,000 SST-2 rows, against 6-1 %
    when the whole set is sorted, and the profile says train time follows the padded tokens.
    Rows of equal length (most rows share a length with many others) still mix at random.
    """

    def __init__(self, lengths: list[int], batch_size: int) -> None:
        self.lengths = torch.tensor(lengths)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        # Global torch RNG, as transformers' samplers: Trainer seeds it and restores it on resume.
        order = torch.randperm(len(self.lengths))
        order = order[torch.argsort(self.lengths[order], stable=True, descending=True)]
        first, *rest = order.split(self.batch_size)
        # The longest batch first (out of memory shows at step 1, as in transformers), a short
        # last batch last (so the DataLoader cuts exactly these batches), the rest shuffled.
        short = [rest.pop()] if rest and len(rest[-1]) < self.batch_size else []
        for batch in [first, *(rest[i] for i in torch.randperm(len(rest)).tolist()), *short]:
            yield from batch.tolist()


class GuardedTrainer(Trainer):
    """Trainer with the non-finite-loss guard, batching rows of similar length.

    With `loraplus_lr_ratio`, the optimizer is PEFT's LoRA+ one: B (and 1-d params) at ratio × lr.
    """

    def __init__(self, *args: Any, loraplus_lr_ratio: float | None = None, **kwargs: Any) -> None:
        self.loraplus_lr_ratio = loraplus_lr_ratio
        super().__init__(*args, **kwargs)
        self.guard = NonFiniteGuard()
        self.add_callback(self.guard)

    def create_optimizer(self, model: Any = None) -> Any:
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        # Trainer's own optimizer class and settings (AdamW, betas, eps), only grouped by LoRA+;
        # Trainer's linear scheduler then scales every group's lr alike, and a resume reloads
        # optimizer.pt into the same groups.
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        kwargs.pop("lr", None)
        self.optimizer = create_loraplus_optimizer(
            model or self.model,
            cls,
            lr=self.args.learning_rate,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay,
            **kwargs,
        )
        return self.optimizer

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        # Every task's tokenize writes a `length` column (Trainer may have pruned it from the copy).
        return LengthBucketSampler(self.train_dataset["length"][:], self._train_batch_size)

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        # The tokenize stage stores eval sorted by length; transformers would regroup it at random.
        if self.args.world_size > 1:
            return None  # accelerate shards it, in order
        return torch.utils.data.SequentialSampler(eval_dataset)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.observe(loss)
        return loss


def fingerprint(p: Params, tokenized: Path) -> str:
    meta = (tokenized / "meta.json").read_text(encoding="utf-8")
    payload = json.dumps([stage_params(p, TRAIN_KEYS), meta], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def training_args(
    p: Params, output_dir: Path, has_eval: bool, rt: Runtime | None = None
) -> TrainingArguments:
    """TrainingArguments from params, every device-dependent field from the runtime.

    Creating them sets up accelerate's process state (and the process group under a launcher),
    so they come before the model loads.
    """
    t, rt = p.train, rt or resolve(p, load_config(p))
    eval_strategy = t.eval_strategy if has_eval else "no"
    return TrainingArguments(
        output_dir=str(output_dir),
        seed=t.seed,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=rt.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        lr_scheduler_type="linear",  # linear warmup, then linear decay to 0
        warmup_steps=t.warmup_ratio,
        max_grad_norm=t.max_grad_norm,
        optim=rt.optim,
        bf16=rt.mixed_precision == "bf16",
        fp16=rt.mixed_precision == "fp16",
        tf32=rt.tf32 or None,  # None: leave torch's default (TF32 off for matmuls)
        ddp_find_unused_parameters=rt.ddp_find_unused_parameters,
        train_sampling_strategy=t.sampling,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must show, not be averaged away
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        **saving(p, eval_strategy),
        save_total_limit=2,
        report_to="none",  # the DVCLive callback is added explicitly, pointed at reports/
        disable_tqdm=not progress.interactive(),  # a bar in a terminal, else lines (progress)
        prediction_loss_only=get_task(p.task).compute_metrics is None,
        dataloader_num_workers=0,
        # Without use_cpu, ranks on a CPU-only machine train unwrapped: no DDP, no gradient sync.
        use_cpu=rt.machine.accelerator == "cpu",
        # Token-weighting across ranks scales the loss by the world size for the model to divide
        # back; classifiers' losses are per-example means that never do (2x gradients on 2 ranks).
        average_tokens_across_devices=get_task(p.task).token_weighted_loss,
        **speed_switches(p, rt),
    )


def train(
    p: Params,
    tokenized: Path,
    adapter_out: Path,
    checkpoint_out: Path,
    report_dir: Path,
    work_root: Path,
    callbacks: Sequence[TrainerCallback] = (),
    rt: Runtime | None = None,
) -> dict[str, Any]:
    """Train LoRA on `tokenized`; write the adapter, the final checkpoint and DVCLive logs.

    `callbacks` are added to the stage's own (bench/harness.py measures the stage with one). `rt`:
    the stage's resolved runtime (resolved for this machine when not given).
    """
    task = get_task(p.task)
    rt = rt or resolve(p, load_config(p))
    data = datasets.load_from_disk(str(tokenized))
    tok = load_tokenizer(p)
    work = work_root / fingerprint(p, tokenized)
    resume = latest_checkpoint(work) if work.exists() else None

    args = training_args(p, work, has_eval="eval" in data, rt=rt)
    use_deterministic(p.train.deterministic, rt)
    set_seed(p.train.seed)  # before the model: LoRA's A and a new head are drawn at creation
    model = load_for_training(p, rt, tok)
    world = args.world_size
    effective_batch = p.train.batch_size * p.train.grad_accum * world
    # Only rank 0 logs: a Live on another rank would clear and rewrite the same folder.
    main_rank = args.process_index == 0
    initial = None
    if p.lora.init in RESIDUAL_INITS:
        # The adapter before any step, kept with the checkpoints so a resume converts the same way.
        initial = work / "initial_adapter"
        if main_rank and not initial.is_dir():
            with atomic_dir(initial) as tmp:
                model.save_pretrained(tmp)
    log.info(
        "rank %d/%d: %d train rows, effective batch %d (B %d × K %d × D %d)",
        *(args.process_index, world, len(data["train"]), effective_batch),
        *(p.train.batch_size, p.train.grad_accum, world),
    )
    live = Live(dir=str(report_dir), dvcyaml=None, save_dvc_exp=False) if main_rank else None
    trainer = GuardedTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("eval"),
        data_collator=task.collator(tok, p),
        processing_class=tok,
        compute_metrics=task.compute_metrics,
        callbacks=[
            StepAlignedDVCLive(live=live),
            LogLastStep(),
            timer := LoopTimer(),
            *callbacks,
            *early_stopping(p),
            *pruning_callbacks(p.train.search_trial),  # empty outside a `lorapipe search` trial
        ],
        loraplus_lr_ratio=p.lora.plus_lr_ratio,
    )
    # Trainer's own: a bar, or (disable_tqdm) raw dicts printed; ours: the loss on the bar, lines
    trainer.remove_callback(ProgressCallback if progress.interactive() else PrinterCallback)
    trainer.add_callback(LossBar() if progress.interactive() else StepLines())
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - start  # with Trainer's setup (and compiling), evals and saves
    trainer.accelerator.wait_for_everyone()  # no rank may still write to `work` when it goes

    trainable, total = model.get_nb_trainable_parameters()
    summary = {
        "effective_batch_size": effective_batch,
        "per_device_batch_size": p.train.batch_size,
        "grad_accum": p.train.grad_accum,
        "devices": world,
        "trainable_params": trainable,
        "all_params": total,
        "global_steps": result.global_step,
        "mixed_precision": rt.mixed_precision,
        "compute_dtype": str(rt.compute_dtype).removeprefix("torch."),
        "base_dtype": str(rt.base_dtype).removeprefix("torch."),
    }
    best = trainer.state.best_model_checkpoint if args.load_best_model_at_end else None
    if best:  # early stopping: Trainer loaded this eval's adapter back, the one saved below
        summary["best_step"] = int(Path(best).name.split("-")[-1])
    if trainer.is_world_process_zero():
        live.summary.update({k: v for k, v in summary.items() if isinstance(v, int | float)})
        live.make_summary()
        trained_with = stage_params(p, [*TRAIN_KEYS, "data.train", "data.eval"])
        with atomic_dir(adapter_out) as tmp:
            save_adapter(model, tmp, initial)  # applies to the original base, whatever the init
            make_portable(tmp, p.model.name)
            tok.save_pretrained(tmp)
            write_json(tmp / "lorapipe_params.json", trained_with)
            card = model_card("LoRA adapter", trained_with, summary, usage(p, adapter_out))
            (tmp / "README.md").write_text(card, encoding="utf-8")
            certify(tmp, adapter_out, rt, report_dir / "metrics.json")
        # Trainer saves at the last step too, by steps or by epoch: a resumable final state.
        final = work / f"checkpoint-{result.global_step}"
        with atomic_dir(checkpoint_out) as tmp:
            shutil.copytree(final, tmp, dirs_exist_ok=True)
            make_portable(tmp, p.model.name)
            certify(tmp, checkpoint_out, rt, report_dir / "metrics.json")
        resumed_from = int(resume.name.split("-")[-1]) if resume else 0
        steps_run = result.global_step - resumed_from
        samples, seconds = steps_run * effective_batch, timer.loop_seconds
        figures = throughput(rt, data["train"], samples, seconds, matmul_params(model))
        write_json(
            report_dir / "timing.json",
            figures
            | {
                "wall_seconds": round(wall, 2),
                "eval_seconds": round(timer.eval_seconds, 2),
                "save_seconds": round(timer.save_seconds, 2),
                "resumed_from_step": resumed_from,
            },
        )
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):  # other runs' resumable work stays
            work_root.rmdir()
    return summary
