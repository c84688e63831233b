"""The runtime resolver: the GPU's specification, tested on a CPU as a table."""

import dataclasses
import time
import types

import pytest
import torch
import yaml

from lorapipe import hardware, plan, runtime
from lorapipe.callbacks import NonFiniteGuard
from lorapipe.config import UserError, parse_params
from lorapipe.recipes import list_recipes, recipe_params
from lorapipe.runtime import describe, resolve
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
for _name in (
    "offline-sst2-minilm",
    "sft-prompt-response",
    "sst2-bert-base",
    "chat-sft-smollm2",
    "sst2-smollm2-generate",
):
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


def test_cpu_autocast_follows_the_measurement_not_the_flags():
    plain = describe("cpu")
    assert resolve(params(), Config(), plain).mixed_precision == "no"  # planned: not measured
    # (measured speedup, native bf16 flags) -> auto's autocast: the flags never decide
    for speedup, flags, want in ((1.4, True, "bf16"), (0.58, True, "no"), (1.1, True, "no")):
        speed = hardware.Bf16Speed(100.0, 100.0 * speedup, speedup, 0.2, "measured now")
        native = dataclasses.replace(plain, bf16=flags, cpu_bf16=speed)
        rt = resolve(params(), Config(), native)
        assert (rt.base_dtype, rt.mixed_precision, rt.device, rt.device_map) == (
            torch.float32,
            want,
            "cpu",
            None,
        ), speedup
        assert f"measured bf16 {speedup:.2f}x fp32" in rt.reasons["mixed_precision"]
        # k-bit: fp32 compute and no autocast (bitsandbytes' bf16 CPU kernels are ~20x slower)
        kbit = resolve(params(**{"quant.bits": 4}), Config(), native)
        assert (kbit.compute_dtype, kbit.mixed_precision) == (torch.float32, "no")


def test_the_cpu_measurement_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(hardware.ENV, raising=False)
    calls = []
    real = hardware.measure

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(hardware, "measure", counted)
    first, second = hardware.bf16_speed(), hardware.bf16_speed()
    assert len(calls) == 1 and first.source == "measured now"
    assert second.source.startswith(f"cached in {tmp_path / 'lorapipe'}")
    assert (second.speedup, second.fp32_gflops) == (first.speedup, first.fp32_gflops)
    monkeypatch.setattr(hardware, "machine_key", lambda: "another CPU | torch 9")
    hardware.bf16_speed()  # another CPU model, flags or torch: measured again
    assert len(calls) == 2 and len(list((tmp_path / "lorapipe").glob("*.json"))) == 2
    monkeypatch.setenv(hardware.ENV, "0.5")
    assert (hardware.bf16_speed().speedup, len(calls)) == (0.5, 2)
    monkeypatch.setenv(hardware.ENV, "fast")
    with pytest.raises(UserError, match=hardware.ENV):
        hardware.bf16_speed()


def test_the_cpu_measurement_is_quick_and_leaves_the_process_as_it_was():
    threads, rng, cpu = torch.get_num_threads(), torch.get_rng_state(), time.thread_time()
    speed = hardware.measure()
    # CPU time: the wall time (speed.seconds, ~0.3 s) grows with other processes' load
    assert time.thread_time() - cpu < 0.6 and speed.fp32_gflops > 0 and speed.bf16_gflops > 0
    # the speedup comes from the unrounded throughputs, the fields are rounded to 0.1
    assert speed.speedup == pytest.approx(speed.bf16_gflops / speed.fp32_gflops, abs=0.02)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)


class FakeCuda:
    """torch.cuda as a GPU machine answers it."""

    def __init__(self, name, major, minor, count=1):
        self.name, self.major, self.minor, self.count = name, major, minor, count

    def is_available(self):
        return True

    def device_count(self):
        return self.count

    def get_device_properties(self, index):
        return types.SimpleNamespace(
            name=self.name, major=self.major, minor=self.minor, total_memory=16 * 2**30
        )

    def is_bf16_supported(self, including_emulation=True):  # torch's default: sm75 "has" it
        return self.major >= 8 or including_emulation

    def max_memory_allocated(self, device):
        return 3e9

    def max_memory_reserved(self, device):
        return 4.5e9


@pytest.mark.parametrize(
    "name, capability, bf16, peak, source",
    [
        ("Tesla T4", (7, 5), False, 65, "datasheet"),
        ("NVIDIA L40S", (8, 9), True, 362, "datasheet"),
        ("NVIDIA GeForce RTX 4090", (8, 9), True, 165.2, "datasheet"),
        ("NVIDIA RTX A6000", (8, 6), True, 154.8, "datasheet"),
        ("NVIDIA H100 PCIe", (9, 0), True, 756, "datasheet"),
        ("NVIDIA H100 80GB HBM3", (9, 0), True, 989, "datasheet"),
        ("NVIDIA A100-SXM4-80GB", (8, 0), True, 312, "datasheet"),
        ("NVIDIA Future GPU", (8, 9), True, 121, "guess from capability 8.9"),
    ],
)
def test_detect_reads_the_gpu_by_name(monkeypatch, name, capability, bf16, peak, source):
    monkeypatch.setattr(runtime.torch, "cuda", FakeCuda(name, *capability))
    m = runtime.detect()
    assert (m.accelerator, m.bf16, m.tf32, m.peak_tflops) == ("cuda", bf16, bf16, peak)
    assert m.peak_source.startswith(source)
    mixed = resolve(params(), Config(), m).mixed_precision
    assert mixed == ("bf16" if bf16 else "fp16")  # a T4 never gets bf16
    timing = runtime.throughput(resolve(params(), Config(), m), Rows(), 10, 2.0, 10**6)
    assert timing["peak_source"] == m.peak_source and timing["peak_tflops"] == peak
    assert (timing["peak_memory_gb_per_device"], timing["peak_reserved_gb_per_device"]) == (3, 4.5)


class Rows:
    """A tokenized set of 4 rows, as throughput() reads it."""

    def __init__(self):
        self.data = {"length": [10, 20, 30, 40]}

    def __getitem__(self, key):
        return self.data[key]

    def __len__(self):
        return 4


def test_merge_attention_is_flash_only_for_16_bit_weights_on_the_gpu():
    flash = dataclasses.replace(describe("h100"), flash_attention=True)
    rt = resolve(params(), Config(), flash)
    assert rt.attn_implementation == "flash_attention_2"
    bf16 = runtime.merge_runtime(rt, torch.bfloat16, 1e9)
    assert bf16.attn_implementation == "flash_attention_2"
    fp32 = runtime.merge_runtime(rt, torch.float32, 1e9)  # flash-attn has no fp32 kernels
    assert (fp32.base_dtype, fp32.attn_implementation) == (torch.float32, "sdpa")
    assert "fp16/bf16 only" in fp32.reasons["attn_implementation"]
    on_cpu = runtime.merge_runtime(rt, torch.bfloat16, 100e9)  # over half the GPU: on the CPU
    assert (on_cpu.device, on_cpu.attn_implementation) == ("cpu", "sdpa")


@pytest.mark.parametrize("name", ["h100x9000", "h100x0", "h100x17", "cpux2"])
def test_machine_counts_are_bounded(name):
    with pytest.raises(UserError, match=rf"--machine: {name} asks for \d+ devices"):
        describe(name)


def test_every_choice_has_a_reason():
    rt = resolve(params(), Config(), describe("a10g"))
    choices = {"device", "device_map", "base_dtype", "mixed_precision", "attn_implementation"}
    assert choices | {"optim", "tf32", "eval_batch_size"} <= set(rt.reasons)
    assert all(rt.reasons.values())
    assert rt.reasons["attn_implementation"] == "planning assumes the default install"


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
    from tests.test_causal_pipeline import causal_params

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


def test_the_precision_bench_shows_the_runtime_decision_beside_its_measurement(monkeypatch):
    from bench import precision

    monkeypatch.setenv(hardware.ENV, "0.5")  # the runtime's figure; the bench measures anew
    choice = precision.runtime_choice(params(**{"train.mixed_precision": "bf16"}))
    assert choice["runtime_auto"] == "no" and "0.50x" in choice["runtime_reason"]
    assert choice["micro_benchmark_now"]["fp32_gflops"] > 0
    side = {"samples_per_s": 1.0, "accuracy": 0.8}
    section = {"train_rows": 1, "batch_size": 1, "repeats": 1, "eval_rows": 1, "fp32": side}
    section |= {"bf16": side, "bf16_speedup": 1.0, "decision": "fp32", "criterion": "c", **choice}
    text = "\n".join(precision.lines(section))
    assert "the runtime's auto on this CPU: no (measured bf16 0.50x" in text
    assert "its micro-benchmark again now: fp32" in text
