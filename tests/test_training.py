"""Training's speed switches, its throughput figures, determinism and log hygiene."""

import json
import logging
import os
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from lorapipe import modeling, training
from lorapipe.callbacks import matmul_params
from lorapipe.config import UserError
from lorapipe.data import tokenize
from lorapipe.modeling import load_config, speed_switches, use_deterministic
from lorapipe.plots import plot_training, read_curves
from lorapipe.quant import BNB_CAST_LOGGER, bnb_config
from lorapipe.runtime import describe, resolve
from lorapipe.sections_model import QuantParams
from lorapipe.training import train, training_args
from tests.test_reliability import small_params


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def tiny_run(p, root, callbacks=()):
    tokenize(p, root / "tokenized")
    args = (root / "tokenized", root / "adapter", root / "ckpt", root / "reports", root / ".work")
    return train(p, *args, callbacks=callbacks, rt=resolve(p, load_config(p), describe("cpu")))


@pytest.mark.parametrize(
    ("machine", "installed", "error"),
    [
        ("cpu", True, "train.liger: Liger's kernels need a CUDA GPU (this machine: cpu)"),
        ("cpu", False, "train.liger: Liger's kernels need a CUDA GPU"),
        ("h100", False, "train.liger: the liger-kernel package (>= 0.3.0) is not installed"),
        ("h100", True, None),
    ],
)
def test_liger_needs_a_cuda_gpu_and_the_package(tiny_bert, monkeypatch, machine, installed, error):
    monkeypatch.setattr(modeling, "is_liger_kernel_available", lambda: installed)
    p = small_params(str(tiny_bert), liger=True)
    rt = resolve(p, load_config(p), describe(machine))
    if error is None:
        assert speed_switches(p, rt) == {"torch_compile": False, "use_liger_kernel": True}
    else:
        with pytest.raises(UserError) as err:
            speed_switches(p, rt)
        assert str(err.value).startswith(error) and "\n" not in str(err.value)


def test_compile_and_liger_reach_training_arguments_off_by_default(tiny_bert, tmp_path):
    p = small_params(str(tiny_bert))
    rt = resolve(p, load_config(p), describe("cpu"))
    args = training_args(p, tmp_path, has_eval=False, rt=rt)
    assert (args.torch_compile, args.use_liger_kernel, args.full_determinism) == (False,) * 3
    compiled = training_args(small_params(str(tiny_bert), compile=True), tmp_path, False, rt)
    assert (compiled.torch_compile, compiled.torch_compile_backend) == (True, "inductor")
    with pytest.raises(UserError, match=r"^train\.liger: "):  # before any weights load
        training_args(small_params(str(tiny_bert), liger=True), tmp_path, False, rt)


def test_deterministic_sets_torch_and_cublas_on_cuda_only(
    tiny_bert, monkeypatch, restore_determinism
):
    for name in ("CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC"):
        monkeypatch.delenv(name, raising=False)
    p = small_params(str(tiny_bert))
    cpu, gpu = (resolve(p, load_config(p), describe(m)) for m in ("cpu", "h100"))
    use_deterministic(True, cpu)
    assert torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    use_deterministic(False, cpu)
    assert not torch.are_deterministic_algorithms_enabled()
    use_deterministic(True, gpu)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert os.environ["FLASH_ATTENTION_DETERMINISTIC"] == "1"
    assert torch.are_deterministic_algorithms_enabled()


@pytest.mark.slow
def test_two_deterministic_runs_give_byte_identical_adapters(
    tiny_bert, tmp_path, restore_determinism
):
    seen = []

    class Probe(training.TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            seen.append(torch.are_deterministic_algorithms_enabled())

    p = small_params(str(tiny_bert), deterministic=True, eval_strategy="no")
    for name in ("a", "b"):
        tiny_run(p, tmp_path / name, [Probe()])
    assert seen and all(seen)  # every step ran under deterministic algorithms
    a, b = ((tmp_path / name / "adapter/adapter_model.safetensors").read_bytes() for name in "ab")
    assert a == b


def test_timing_counts_the_loop_not_evaluation_or_saving(tiny_bert, tmp_path, monkeypatch):
    slow = 0.6  # seconds added to every evaluation and every checkpoint save
    calls = {"eval": 0, "save": 0}
    evaluate, save = training.GuardedTrainer.evaluate, training.GuardedTrainer._save_checkpoint

    def slow_evaluate(self, *args, **kwargs):
        calls["eval"] += 1
        time.sleep(slow)
        return evaluate(self, *args, **kwargs)

    def slow_save(self, *args, **kwargs):
        calls["save"] += 1
        time.sleep(slow)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(training.GuardedTrainer, "evaluate", slow_evaluate)
    monkeypatch.setattr(training.GuardedTrainer, "_save_checkpoint", slow_save)
    passed = {}
    throughput = training.throughput

    def spy(rt, rows, samples, seconds, params):
        passed.update(samples=samples, seconds=seconds, params=params)
        return throughput(rt, rows, samples, seconds, params)

    monkeypatch.setattr(training, "throughput", spy)
    p = small_params(str(tiny_bert), eval_strategy="epoch")
    tiny_run(p, tmp_path)
    timing = json.loads((tmp_path / "reports/timing.json").read_text())
    assert calls == {"eval": 1, "save": 3}  # 12 steps: saves at 4, 8 and 12
    assert timing["eval_seconds"] >= slow * calls["eval"]
    assert timing["save_seconds"] >= slow * calls["save"]
    outside = timing["wall_seconds"] - timing["train_seconds"]
    assert outside >= slow * (calls["eval"] + calls["save"])
    assert timing["train_seconds"] == round(passed["seconds"], 2)
    assert timing["samples_per_second"] == round(passed["samples"] / passed["seconds"], 2)
    assert passed["samples"] == 12 * 8
    # N: the frozen BERT less its three embedding tables (word, position, token type)
    config = BertConfig.from_pretrained(tiny_bert)
    tables = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * 32
    base = sum(t.numel() for t in BertForSequenceClassification(config).parameters())
    assert passed["params"] == base - tables


def lora(model, **kwargs):
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs))


@pytest.mark.parametrize("tied", [False, True])
def test_mfu_params_leave_out_an_untied_input_embedding(tied):
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    base = LlamaForCausalLM(config)
    assert (base.lm_head.weight is base.model.embed_tokens.weight) == tied
    count = base.num_parameters()  # a tied weight once
    model = lora(base)
    table = 1000 * 32
    assert matmul_params(model) == (count if tied else count - table)


def test_mfu_params_count_a_trained_head_once():
    config = BertConfig(
        vocab_size=500,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    base = BertForSequenceClassification(config)
    count = base.num_parameters()
    model = get_peft_model(
        base,
        LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    tables = (500 + 64 + 2) * 32
    assert matmul_params(model) == count - tables


def test_8bit_cast_warning_is_said_once(tiny_llama, monkeypatch, caplog):
    # On a CPU bitsandbytes takes its warning path (MatMul8bitLt) outside training mode.
    monkeypatch.setattr(logging.getLogger(BNB_CAST_LOGGER), "filters", [])
    quant = bnb_config(QuantParams(bits=8), torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama, quantization_config=quant, dtype=torch.bfloat16
    ).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    # the bitsandbytes logger's own level too: a stage run earlier may have quieted it
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"), torch.no_grad():
        model(ids)
        model(ids)
    casts = [r for r in caplog.records if "inputs will be cast" in r.getMessage()]
    assert [r.getMessage() for r in casts] == [
        "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization"
    ]
    other = logging.getLogger(BNB_CAST_LOGGER)
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        other.warning("something else")
        other.warning("something else")
    assert sum(r.getMessage() == "something else" for r in caplog.records) == 2


def test_a_run_shorter_than_logging_steps_logs_its_last_step_and_plots(tiny_bert, tmp_path):
    # 56 rows at batch 8: 7 optimizer steps, fewer than train.logging_steps.
    p = small_params(str(tiny_bert), logging_steps=10, eval_strategy="no")
    p = p.model_copy(update={"data": p.data.model_copy(update={"max_train_rows": 56})})
    tiny_run(p, tmp_path)
    metrics = tmp_path / "reports/plots/metrics"
    curves = read_curves(metrics)
    assert curves["loss"].step.tolist() == [7]
    assert curves["learning_rate"].step.tolist() == [7]
    assert plot_training(metrics, tmp_path / "figures") == ["loss_lr.png"]


def test_plots_draw_whatever_curves_exist(tmp_path):
    metrics = tmp_path / "metrics"
    (metrics / "eval").mkdir(parents=True)
    (metrics / "eval/accuracy.tsv").write_text("timestamp\tstep\taccuracy\n0\t7\t0.5\n")
    assert plot_training(metrics, tmp_path / "a") == ["eval_per_epoch.png"]
    (metrics / "learning_rate.tsv").write_text("timestamp\tstep\tlearning_rate\n0\t7\t0.001\n")
    assert plot_training(metrics, tmp_path / "b") == ["eval_per_epoch.png", "loss_lr.png"]
    (metrics / "eval/accuracy.tsv").unlink()
    (metrics / "learning_rate.tsv").unlink()
    assert plot_training(metrics, tmp_path / "c") == []
