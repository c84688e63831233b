"""The runtime resolver: the GPU's specification, tested on a CPU as a table."""

import dataclasses

import pytest
import torch
import yaml

from lorapipe import plan
from lorapipe.callbacks import NonFiniteGuard
from lorapipe.config import UserError, parse_params
from lorapipe.recipes import list_recipes, recipe_params
from lorapipe.runtime import Machine, describe, resolve
from tests.conftest import ROOT

MACHINES = ["cpu", "t4", "a10g", "h100", "h100x8"]
# (recipe, machine): base dtype, compute dtype, autocast, distinct rank devices, fits.
# The rules: CPU fp32 everywhere; a GPU with bf16 keeps the base and computes in bf16 with bf16
# autocast; the T4 (no bf16) runs a full-precision base in fp16 with fp16 autocast, and a k-bit
# base in fp32 without autocast (fp16 autocast over k-bit layers overflows); h100x8 gives each
# of 8 ranks its own GPU. "Fits": training and evaluation peaks within the device's memory.
F32, BF16, F16 = "float32", "bfloat16", "float16"
SPEC = {
    "finsent-llama8b-8bit": {
        "cpu": (F32, F32, "no", 1, False),  # ~33 GiB in fp32: over 24 GB
        "t4": (F32, F32, "no", 1, False),
        "a10g": (BF16, BF16, "bf16", 1, True),
        "h100": (BF16, BF16, "bf16", 1, True),
        "h100x8": (BF16, BF16, "bf16", 8, True),
    },
    "offline-python-smollm2-qlora": {
        "cpu": (F32, F32, "no", 1, True),
        "t4": (F32, F32, "no", 1, True),
        "a10g": (BF16, BF16, "bf16", 1, True),
        "h100": (BF16, BF16, "bf16", 1, True),
        "h100x8": (BF16, BF16, "bf16", 8, True),
    },
    "wikitext2-qwen-qlora": {
        "cpu": (F32, F32, "no", 1, True),
        "t4": (F32, F32, "no", 1, True),
        "a10g": (BF16, BF16, "bf16", 1, True),
        "h100": (BF16, BF16, "bf16", 1, True),
        "h100x8": (BF16, BF16, "bf16", 8, True),
    },
}
FULL_PRECISION = {
    "cpu": (F32, F32, "no", 1, True),
    "t4": (F16, F16, "fp16", 1, True),
    "a10g": (BF16, BF16, "bf16", 1, True),
    "h100": (BF16, BF16, "bf16", 1, True),
    "h100x8": (BF16, BF16, "bf16", 8, True),
}
for _name in ("offline-sst2-minilm", "sft-prompt-response", "sst2-bert-base", "chat-sft-smollm2"):
    SPEC[_name] = FULL_PRECISION
SPEC["sst2-bert-handwritten"] = FULL_PRECISION


def test_every_recipe_has_a_row():
    assert sorted(SPEC) == sorted(list_recipes())


@pytest.mark.parametrize("recipe", sorted(SPEC))
def test_the_table(recipe):
    p = recipe_params(recipe)
    for name in MACHINES:
        result = plan.machine_plan(p, describe(name))
        rt = result["runtime"]
        got = (
            rt["base_dtype"],
            rt["compute_dtype"],
            rt["mixed_precision"],
            len(set(rt["rank_devices"])),
            result["fits"],
        )
        assert got == SPEC[recipe][name], name
        assert rt["tf32"] == (name not in ("cpu", "t4"))
        assert result["effective_batch_size"] == (
            p.train.batch_size * p.train.grad_accum * (8 if name == "h100x8" else 1)
        )


def params(**changes):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        *section, key = dotted.split(".")
        (raw[section[0]] if section else raw)[key] = value
    return parse_params(raw)


class Config:
    vocab_size = 151_936


@pytest.mark.parametrize("bits", ["none", 4, 8])
def test_each_rank_loads_onto_its_own_gpu(bits):
    rank3 = dataclasses.replace(describe("h100x8"), local_rank=3)
    rt = resolve(params(**{"quant.bits": bits}), Config(), rank3)
    assert rt.device == "cuda:3" and rt.device_map == {"": "cuda:3"}
    assert rt.rank_devices() == [f"cuda:{i}" for i in range(8)]


def test_load_base_passes_the_rank_device_and_dtype(tiny_bert, monkeypatch):
    from lorapipe import modeling

    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(modeling.get_task("seq_cls").auto_model, "from_pretrained", fake)
    rt = resolve(params(), Config(), dataclasses.replace(describe("h100x8"), local_rank=5))
    with pytest.raises(RuntimeError, match="stop"):
        modeling.load_base(params(**{"model.name": str(tiny_bert)}), rt, 0)
    assert seen["device_map"] == {"": "cuda:5"} and seen["dtype"] == torch.bfloat16
    assert seen["attn_implementation"] == "sdpa"


def test_checkpointing_is_non_reentrant_and_ddp_expects_every_param():
    rt = resolve(params(**{"train.gradient_checkpointing": True}), Config(), describe("h100x8"))
    assert rt.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert rt.ddp_find_unused_parameters is False


def test_precision_rules():
    t4 = describe("t4")
    # auto never picks fp16 autocast over a k-bit base (the explicit fp16 is refused by config)
    assert resolve(params(**{"quant.bits": 4}), Config(), t4).mixed_precision == "no"
    with pytest.raises(UserError, match=r"train\.mixed_precision: bf16, but t4 has no bf16"):
        resolve(params(**{"train.mixed_precision": "bf16"}), Config(), t4)
    with pytest.raises(UserError, match=r"quant\.compute_dtype: bfloat16, but t4"):
        resolve(params(**{"quant.bits": 4, "quant.compute_dtype": "bfloat16"}), Config(), t4)
    with pytest.raises(UserError, match=r"train\.num_processes: 4 processes but h100 has 1"):
        resolve(params(**{"train.num_processes": 4}), Config(), describe("h100"))
    assert resolve(params(), Config(), describe("a100-80x4")).world_size == 4


def test_evaluation_batch_is_bounded_by_the_logits_memory():
    # 64 rows x 512 tokens x 152k vocab would hold ~50 GB of logits
    p = params(**{"task": "causal_lm", "tokenize.max_length": 512, "evaluate.batch_size": 64})
    a10g = resolve(p, Config(), describe("a10g"))
    per_row = 512 * Config.vocab_size * (2 + 4 + 4)
    assert a10g.eval_batch_size == int(24e9 / 8 // per_row) == 3
    assert resolve(p, Config(), describe("h100")).eval_batch_size == 12
    classifier = resolve(params(), Config(), describe("t4"))
    assert classifier.eval_batch_size == 64  # a few logits per row: never lowered


def test_plan_reports_evaluation_memory_and_the_runtime(capsys):
    from lorapipe.cli import main

    main(["plan", "--recipe", "wikitext2-qwen-qlora", "--machine", "h100x8"])
    out = capsys.readouterr().out
    assert "Runtime on h100x8 (8 process(es)" in out
    assert "evaluation" in out and "fits: yes" in out
    assert "Effective batch: B 4 x K 4 x D 8 = 128" in out
    with pytest.raises(SystemExit):
        main(["plan", "--machine", "v100"])
    assert "unknown machine 'v100'" in capsys.readouterr().err


def test_cpu_base_is_fp32_with_bf16_autocast_where_the_cpu_has_it():
    plain = Machine("cpu", "cpu", 1, memory_gb=24, bf16=False)
    native = dataclasses.replace(plain, bf16=True)  # AVX512-BF16 / AMX: the benchmark's choice
    rt = resolve(params(), Config(), native)
    assert (rt.base_dtype, rt.mixed_precision, rt.device, rt.device_map) == (
        torch.float32,
        "bf16",
        "cpu",
        None,
    )
    assert resolve(params(), Config(), plain).mixed_precision == "no"
    # k-bit: fp32 compute and no autocast (bitsandbytes' bf16 CPU kernels are ~20x slower)
    kbit = resolve(params(**{"quant.bits": 4}), Config(), native)
    assert (kbit.compute_dtype, kbit.mixed_precision) == (torch.float32, "no")


def test_the_nan_guard_never_reads_the_loss_on_the_host_per_micro_step():
    guard = NonFiniteGuard()
    for _ in range(4):  # a meta tensor raises on any host read: observe must not sync
        guard.observe(torch.tensor(1.0, device="meta"))
    guard.flag = torch.tensor(False)
    guard.on_pre_optimizer_step(None, None, None)  # the one read per optimizer step
    guard.observe(torch.tensor(float("inf")))
    guard.observe(torch.tensor(1.0))  # a later finite micro-step does not clear it

    class State:
        global_step = 6

    class Args:
        output_dir = "work"

    with pytest.raises(UserError, match="loss became nan or inf at step 7"):
        guard.on_pre_optimizer_step(Args(), State(), None)


def test_a_bf16_checkpoint_is_merged_saved_and_verified_in_bf16(tiny_llama, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorapipe.pipeline import run_all
    from tests.test_causal import causal_params

    bf16 = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(bf16)
    result = run_all(parse_params(causal_params(str(bf16))), tmp_path / "run")
    merge = result["merge"]
    assert merge["passed"] and merge["tolerance"] == 0.1  # auto, for bf16
    sides = (merge["expected"], merge["merged"])
    assert [(s["device"], s["dtype"]) for s in sides] == [("cpu", "bfloat16")] * 2
    assert result["train"]["base_dtype"] == "float32"  # trained on this CPU in fp32
    with safe_open(tmp_path / "run/merged/model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
