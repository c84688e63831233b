"""Tests for the weight-free planner: exact PEFT counts from shipped configs, memory estimate."""

import json
import resource
import time

import huggingface_hub.constants
import pytest
from peft import LoraConfig

from lorapipe import plan as P
from lorapipe.modeling import build_meta_model
from lorapipe.tasks import get_task

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def lora(task: str, r: int, alpha: int, targets: list[str]) -> LoraConfig:
    return LoraConfig(
        task_type=get_task(task).peft_task_type, r=r, lora_alpha=alpha, target_modules=targets
    )


@pytest.fixture(scope="module")
def bert_counts() -> dict:
    config = P.load_model_config("bert-base-uncased")
    return P.count_trainable(config, lora("seq_cls", 8, 16, ["query", "value"]), "seq_cls", 2)


@pytest.fixture(scope="module")
def qwen():
    config = P.load_model_config("Qwen/Qwen2.5-3B")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    counts = P.count_trainable(config, lora("causal_lm", 16, 32, targets), "causal_lm")
    return config, counts


def test_shipped_configs_are_the_published_ones() -> None:
    llama8 = P.load_model_config("meta-llama/Llama-3.1-8B-Instruct")
    assert (llama8.hidden_size, llama8.num_hidden_layers, llama8.num_key_value_heads) == (
        4096,
        32,
        8,
    )
    assert (llama8.intermediate_size, llama8.vocab_size) == (14336, 128256)
    qwen = P.load_model_config("Qwen/Qwen2.5-3B")
    assert qwen.tie_word_embeddings and qwen.num_key_value_heads == 2
    bert = P.load_model_config("bert-base-uncased")
    assert (bert.vocab_size, bert.max_position_embeddings) == (30522, 512)


def test_bert_matches_peft_print(bert_counts: dict) -> None:
    assert bert_counts["lora_params"] == 294_912
    assert bert_counts["lora_per_module"] == {"query": 147_456, "value": 147_456}
    # LoRA plus the trainable copy of the 2-label classifier (768 * 2 + 2 = 1,538).
    assert bert_counts["trainable"] == 294_912 + 1_538 == 296_450
    assert bert_counts["all"] == 109_780_228
    assert bert_counts["base_params"] == 109_483_778
    assert P.peft_line(bert_counts) == (
        "trainable params: 296,450 || all params: 109,780,228 || trainable%: 0.2700"
    )


def test_tutorial_figures_are_not_reachable(bert_counts: dict) -> None:
    # PEFT's "all" always includes the injected LoRA weights, so it exceeds the bare base.
    assert bert_counts["all"] > bert_counts["base_params"] == 109_483_778
    assert P.peft_line(bert_counts).startswith(
        "trainable params: 296,450 || all params: 109,780,228"
    )
    # The tutorial's 590,848 is no count PEFT gives for LoRA on BERT: not at the r that comes
    # closest (16 on query+value: 589,824 + the 1,538 head), nor at any r on any of its targets.
    config = P.load_model_config("bert-base-uncased")
    r16 = P.count_trainable(config, lora("seq_cls", 16, 16, ["query", "value"]), "seq_cls", 2)
    assert (r16["lora_params"], r16["trainable"]) == (589_824, 591_362)
    per_r = {}
    for targets in (["query"], ["query", "value"], ["query", "key", "value"], ["dense"]):
        counts = P.count_trainable(config, lora("seq_cls", 1, 16, targets), "seq_cls", 2)
        assert counts["trainable"] - counts["lora_params"] == 1_538  # the head copy
        assert counts["lora_params"] % 768 == 0
        per_r[tuple(targets)] = counts["lora_params"]  # LoRA grows linearly in r
    for lora_per_r in per_r.values():
        for head in (0, 1_538):
            assert (590_848 - head) % lora_per_r, lora_per_r


def test_llama_70b_on_meta_is_fast_and_exact() -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    counts = P.count_trainable(
        P.load_model_config("meta-llama/Llama-3.1-70B"),
        lora("causal_lm", 4, 8, ["q_proj", "k_proj", "v_proj"]),
        "causal_lm",
    )
    assert time.perf_counter() - start < 15
    # ru_maxrss is KiB on Linux; 140 GB of bf16 weights would be far beyond 2 GiB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 2 * 2**20
    assert counts["base_params"] == 70_553_706_496
    assert counts["lora_params"] == 11_141_120 == 139_264 * 80
    # q: 4*(8192+8192), k and v: 4*(8192+1024) each, per layer, summed over 80 layers.
    assert counts["lora_per_module"] == {
        "q_proj": 65_536 * 80,
        "k_proj": 36_864 * 80,
        "v_proj": 36_864 * 80,
    }
    assert counts["trainable"] == counts["lora_params"]
    assert counts["all"] == 70_553_706_496 + 11_141_120
    ratio = counts["base_params"] / counts["lora_params"]
    assert ratio == pytest.approx(6_332.73, abs=0.01)
    # The often-quoted ~6,337x comes from the rounded 70.6e9 / 11.14e6.
    assert ratio == pytest.approx(6_337, rel=1e-3)


def test_qwen_4bit_memory(qwen) -> None:
    config, counts = qwen
    args = dict(bits=4, batch_size=4, seq_len=2048)
    with_gc = P.estimate_memory(config, counts, gradient_checkpointing=True, **args)
    without_gc = P.estimate_memory(config, counts, gradient_checkpointing=False, **args)
    assert with_gc["activations"] < without_gc["activations"]
    assert with_gc["total"] < without_gc["total"]
    assert with_gc["total"] == sum(v for k, v in with_gc.items() if k != "total")
    bf16 = P.estimate_memory(config, counts, None, 4, 2048, True)
    frozen = counts["all"] - counts["trainable"]
    assert bf16["weights"] == 2 * frozen
    # The quantized linear layers cost 0.5 byte + ~0.127 bit of absmax per weight (double
    # quantization): 0.2580x their bf16 size, a little over a quarter.
    quantized = counts["quantizable_params"]
    kept_bf16 = (frozen - quantized) * 2
    assert (with_gc["weights"] - kept_bf16) / (quantized * 2) == pytest.approx(0.2580, abs=1e-4)
    # Without double quantization absmax is a full fp32 per 64 weights: 0.5625 byte per weight.
    plain = P.estimate_memory(
        config, counts, double_quant=False, gradient_checkpointing=True, **args
    )
    assert plain["weights"] - kept_bf16 == int(quantized * 0.5625)
    # The tied 151,936 x 2,048 embedding stays bf16, so the whole model is a third of its bf16
    # size; the rest shrinks ~3.9x.
    embed_bytes = config.vocab_size * config.hidden_size * 2
    assert with_gc["weights"] - embed_bytes < (bf16["weights"] - embed_bytes) / 3.8
    assert with_gc["weights"] < bf16["weights"] / 2.9
    # Adapters, gradients and AdamW states are fp32: 4 + 4 + 8 bytes per trainable parameter.
    assert (
        with_gc["adapters"] + with_gc["gradients"] + with_gc["optimizer"]
        == 16 * counts["trainable"]
    )


def test_qwen_tied_head_is_not_quantized(qwen) -> None:
    config, counts = qwen
    embed = config.vocab_size * config.hidden_size
    # Tied lm_head / embed_tokens is counted once and stays in compute dtype.
    assert counts["base_params"] == 3_085_938_688
    assert counts["base_params"] - counts["quantizable_params"] > embed


def test_format_plan_report(bert_counts: dict) -> None:
    config = P.load_model_config("bert-base-uncased")
    mems = [P.estimate_memory(config, bert_counts, None, 8, 128, gc) for gc in (False, True)]
    report = P.format_plan("bert-base-uncased", bert_counts, *mems, device_gb=12)
    assert "trainable params: 296,450 || all params: 109,780,228 || trainable%: 0.2700" in report
    assert "query: 147,456" in report
    for gb in ("12 GB", "24 GB", "40 GB", "80 GB"):
        assert f"{gb}: yes without / yes with" in report


def test_plan_end_to_end_for_70b_in_4bit() -> None:
    report = P.plan(
        "meta-llama/Llama-3.1-70B", "causal_lm", 4, 8, ["q_proj", "k_proj", "v_proj"], 2, 4, 1, 512
    )
    assert "trainable params: 11,141,120 || all params: 70,564,847,616" in report
    assert "24 GB: no without / no with" in report


def test_local_folder_config(tmp_path) -> None:
    shipped = P.MODEL_CONFIGS_DIR / "bert-base-uncased.json"
    data = json.loads(shipped.read_text()) | {"num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert P.load_model_config(str(tmp_path)).num_hidden_layers == 2


def test_unknown_hub_id_offline_is_one_line_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time, so patch the parsed constant too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError) as info:
        P.load_model_config("no-such-org/no-such-model")
    message = str(info.value)
    assert "\n" not in message
    assert "no-such-org/no-such-model" in message and "unreachable" in message


def test_rejects_bad_arguments(bert_counts: dict) -> None:
    config = P.load_model_config("bert-base-uncased")
    with pytest.raises(ValueError):
        build_meta_model(config, "translation")
    with pytest.raises(ValueError):
        P.estimate_memory(config, bert_counts, 3, 1, 8, False)


def test_plan_of_the_packaged_default_matches_what_training_counts():
    """The planner's counts against the model the train stage builds (not a committed report)."""
    from lorapipe.config import load_params
    from lorapipe.lora import lora_config
    from lorapipe.modeling import load_for_training, load_tokenizer
    from lorapipe.runtime import resolve
    from tests.conftest import ROOT as root

    p = load_params(root / "params.yaml")
    config = P.load_model_config(p.model.name)  # pkg:… resolves to the package's folder
    counts = P.count_trainable(config, lora_config(p), p.task, p.data.num_labels)
    model = load_for_training(p, resolve(p, config), load_tokenizer(p))
    trained = model.get_nb_trainable_parameters()  # what train() reports
    assert (counts["trainable"], counts["all"]) == trained == (74_498, 22_788_484)


def test_plan_says_why_each_runtime_choice_was_made(capsys) -> None:
    from lorapipe.cli import main

    main(["plan", "--recipe", "wikitext2-qwen-qlora", "--machine", "t4"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for choice in ("device", "device_map", "base_dtype", "mixed_precision", "attn_implementation"):
        assert "← " in rows[choice], choice
    assert "fp16 autocast over a k-bit base overflows" in rows["mixed_precision"]
    assert "planning assumes the default install" in rows["attn_implementation"]


@pytest.mark.parametrize("machine", ["h100x9000", "a10gx0"])
def test_plan_refuses_an_impossible_device_count_in_one_line(capsys, machine) -> None:
    from lorapipe.cli import main

    with pytest.raises(SystemExit) as info:
        main(["plan", "--recipe", "wikitext2-qwen-qlora", "--machine", machine])
    assert info.value.code != 0
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert f"--machine: {machine} asks for" in captured.err and len(captured.err) < 200
