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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from dvclive import Live
from peft.optimizers import create_loraplus_optimizer
from safetensors import safe_open
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import DVCLiveCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lorapipe import progress
from lorapipe.card import model_card
from lorapipe.config import MODEL_KEYS, QUANT_KEYS, Params, UserError, stage_params
from lorapipe.io import atomic_dir, read_json, write_json
from lorapipe.lora import ADAPTER_KEYS, RESIDUAL_INITS, save_adapter
from lorapipe.modeling import load_config, load_for_training, load_tokenizer
from lorapipe.runtime import Runtime, peak_memory_gb, resolve
from lorapipe.tasks import get_task

log = logging.getLogger(__name__)

# Exactly the params the train stage reads: dvc.yaml lists the same keys.
TRAIN_KEYS = [
    *MODEL_KEYS,
    *ADAPTER_KEYS,
    "lora.dropout",
    "lora.plus_lr_ratio",
    *QUANT_KEYS,
    *(
        f"train.{k}"
        for k in (
            "seed",
            "epochs",
            "max_steps",
            "batch_size",
            "grad_accum",
            "learning_rate",
            "weight_decay",
            "warmup_ratio",
            "max_grad_norm",
            "mixed_precision",
            "sampling",
            "gradient_checkpointing",
            "logging_steps",
            "eval_strategy",
            "eval_steps",
            "save_steps",
            "num_processes",
            "distributed",
        )
    ),
]
CHECKPOINT_FILES = (
    "trainer_state.json",
    "optimizer.pt",
    "scheduler.pt",
    "adapter_model.safetensors",
)


class NonFiniteLoss(UserError):
    pass


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


def fingerprint(p: Params, tokenized: Path) -> str:
    meta = (tokenized / "meta.json").read_text(encoding="utf-8")
    payload = json.dumps([stage_params(p, TRAIN_KEYS), meta], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def checkpoint_ok(folder: Path) -> bool:
    """A checkpoint is usable only if every file was written completely."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
        with safe_open(folder / "adapter_model.safetensors", "pt") as f:
            list(f.keys())
        return all((folder / name).stat().st_size > 0 for name in CHECKPOINT_FILES)
    except Exception:  # any unreadable file, whatever the reader raises, means incomplete
        return False


def latest_checkpoint(work: Path) -> Path | None:
    candidates = sorted(work.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[-1]))
    for folder in reversed(candidates):
        if checkpoint_ok(folder):
            return folder
        warnings.warn(f"skipping incomplete checkpoint {folder}", stacklevel=2)
    return None


def record_portable_base(folder: Path, name: str) -> None:
    """Record the base as params name it (pkg:…, hub id), not as the folder it loaded from.

    PEFT writes the resolved folder, for a packaged model a path inside this virtualenv: another
    machine could not load it, and the adapter's DVC hash would differ per venv path.
    modeling.load_with_adapter resolves the name on the machine that loads it. (Rewritten after
    saving: PEFT's save looks the recorded name up as a folder or on the hub.)
    """
    config = folder / "adapter_config.json"
    raw = read_json(config)
    old, raw["base_model_name_or_path"] = raw.get("base_model_name_or_path"), name
    write_json(config, raw)
    readme = folder / "README.md"  # PEFT's own card (in checkpoints) names the base too
    if old and readme.is_file():
        readme.write_text(readme.read_text(encoding="utf-8").replace(old, name), encoding="utf-8")


def usage(p: Params, adapter: Path) -> str:
    """The model card's snippet: PEFT alone reads a hub id; a pkg: base needs lorapipe."""
    task = get_task(p.task)
    if not p.model.name.startswith("pkg:") and not p.model.name.endswith(".gguf"):
        auto = task.auto_model.__name__.replace("AutoModel", "AutoPeftModel")
        return f"from peft import {auto}\nmodel = {auto}.from_pretrained('{adapter}')"
    return (
        "from lorapipe.config import load_params\n"
        "from lorapipe.modeling import load_config, load_tokenizer, load_with_adapter\n"
        "from lorapipe.runtime import resolve\n\n"
        "# resolves the base this adapter records (a packaged model) on this machine\n"
        "p = load_params('params.yaml')\n"
        "rt, pad = resolve(p, load_config(p)), load_tokenizer(p).pad_token_id\n"
        f"model = load_with_adapter(p, rt, '{adapter}', pad)"
    )


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
        save_strategy="steps",
        save_steps=t.save_steps,
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
    )


def throughput(
    rt: Runtime, rows: datasets.Dataset, samples: int, seconds: float, params: int
) -> dict[str, Any]:
    """Wall-clock figures (they differ run to run: timing.json, not metrics.json).

    tokens/s counts real (non-pad) tokens, from the set's mean row length. MFU takes 4·N FLOPs
    per token for N base params (forward 2N, backward 2N for activation gradients only: the base
    is frozen; LoRA's own FLOPs and attention's are left out, recomputation is not counted).
    """
    tokens = samples * sum(rows["length"][:]) / max(len(rows), 1)
    out: dict[str, Any] = {
        "train_seconds": round(seconds, 2),
        "samples_per_second": round(samples / seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "device": rt.machine.name,
    }
    peak = rt.machine.peak_tflops
    if peak:
        out["mfu"] = round(4 * params * tokens / seconds / (peak * 1e12 * rt.world_size), 4)
    memory = peak_memory_gb(rt)
    if memory is not None:
        out["peak_memory_gb_per_device"] = round(memory, 2)
    return out


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
        args.process_index,
        world,
        len(data["train"]),
        effective_batch,
        p.train.batch_size,
        p.train.grad_accum,
        world,
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
        callbacks=[StepAlignedDVCLive(live=live), *callbacks],
        loraplus_lr_ratio=p.lora.plus_lr_ratio,
    )
    # Trainer's own: a bar, or (disable_tqdm) raw dicts printed; ours: the loss on the bar, lines
    trainer.remove_callback(ProgressCallback if progress.interactive() else PrinterCallback)
    trainer.add_callback(LossBar() if progress.interactive() else StepLines())
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
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
    if trainer.is_world_process_zero():
        live.summary.update({k: v for k, v in summary.items() if isinstance(v, int | float)})
        live.make_summary()
        trained_with = stage_params(p, [*TRAIN_KEYS, "data.train", "data.eval"])
        with atomic_dir(adapter_out) as tmp:
            save_adapter(model, tmp, initial)  # applies to the original base, whatever the init
            record_portable_base(tmp, p.model.name)
            tok.save_pretrained(tmp)
            write_json(tmp / "lorapipe_params.json", trained_with)
            card = model_card("LoRA adapter", trained_with, summary, usage(p, adapter_out))
            (tmp / "README.md").write_text(card, encoding="utf-8")
        # save_strategy="steps" makes Trainer save at the last step too: a resumable final state.
        final = work / f"checkpoint-{result.global_step}"
        with atomic_dir(checkpoint_out) as tmp:
            shutil.copytree(final, tmp, dirs_exist_ok=True)
            record_portable_base(tmp, p.model.name)
        resumed_from = int(resume.name.split("-")[-1]) if resume else 0
        steps_run = result.global_step - resumed_from
        write_json(
            report_dir / "timing.json",
            throughput(rt, data["train"], steps_run * effective_batch, seconds, total)
            | {"resumed_from_step": resumed_from},
        )
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):  # other runs' resumable work stays
            work_root.rmdir()
    return summary
