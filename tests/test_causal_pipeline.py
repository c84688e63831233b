"""Causal LM and prompt → response: perplexity, the pad/pack layouts, a real 4-bit SmolLM2 run."""

import math

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorapipe.config import parse_params
from lorapipe.evaluation import evaluate_model
from lorapipe.merge import _logits
from lorapipe.modeling import load_config, load_tokenizer, load_with_adapter
from lorapipe.pipeline import run_all
from lorapipe.recipes import recipe_params
from lorapipe.runtime import resolve
from lorapipe.tasks import get_task
from tests.conftest import ROOT


def causal_params(model: str, **sections) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["task"] = "causal_lm"
    raw["model"]["name"] = model
    raw["data"].update(
        train="pydoc:topics", eval=None, text_field="text", max_train_rows=40, max_eval_rows=12
    )
    raw["tokenize"].update(max_length=32)
    raw["lora"]["target_modules"] = ["q_proj", "v_proj"]
    raw["train"].update(epochs=1, batch_size=4, logging_steps=2, save_steps=5)
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return raw


def test_perplexity_matches_a_direct_computation(tiny_llama):
    p = parse_params(causal_params(str(tiny_llama), tokenize__layout="pad"))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = datasets.Dataset.from_dict({"text": ["a b c d e f g h i j", "short", "x y z w"] * 3})
    task = get_task("causal_lm")
    data = task.tokenize(rows, tok, p, "data.eval")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    got = evaluate_model(model, data, task.collator(tok, p), task, batch_size=4)

    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in data["input_ids"]:  # one unpadded row at a time: no padding can leak in
            ids = torch.tensor([ids])
            loss = model(input_ids=ids, labels=ids).loss.item()  # mean over len-1 targets
            nll += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert got["tokens"] == count
    assert math.isclose(got["perplexity"], math.exp(nll / count), rel_tol=1e-5)


@pytest.mark.parametrize(
    ("task", "layout", "perplexity"),
    [
        ("causal_lm", "pack", "blocks"),
        ("causal_lm", "pad", "sliding_window"),
        ("sft", "pack", "blocks"),
    ],
)
def test_each_mode_runs_all_stages(tiny_llama, tmp_path, task, layout, perplexity):
    raw = causal_params(str(tiny_llama), tokenize__layout=layout, evaluate__perplexity=perplexity)
    raw["task"] = task
    if task == "sft":
        raw["data"]["train"] = "pydoc:qa"
        raw["tokenize"]["max_length"] = 64
    result = run_all(parse_params(raw), tmp_path)
    tuned = result["eval"]["tuned"]
    assert tuned["tokens"] > 0 and math.isfinite(tuned["perplexity"])
    assert result["eval"]["base"]["tokens"] == tuned["tokens"]
    if perplexity == "sliding_window":  # every token of the eval stream but the first, once
        stream = datasets.load_from_disk(str(tmp_path / "tokenized"))["eval_stream"]
        assert tuned["tokens"] == sum(len(x) for x in stream["input_ids"]) - 1
    assert result["merge"]["passed"]
    samples = (tmp_path / "reports/samples.json").read_text()
    assert '"generated"' in samples


@pytest.mark.slow
def test_real_smollm2_in_4bit_trains_and_merges(tmp_path):
    raw = recipe_params("offline-python-smollm2-qlora").model_dump()
    raw["data"].update(max_train_rows=40, max_eval_rows=10)
    raw["tokenize"]["max_length"] = 128
    raw["train"].update(max_steps=4, logging_steps=1, save_steps=2)
    raw["evaluate"].update(num_samples=1, max_new_tokens=8)
    # fp32 rounding alone moves SmolLM2's logits (|logit| up to ~43) by 6.6e-5..7.9e-5 with the
    # batch order the adapter was trained in (relative ~2e-6, under auto's 1e-4). What the check
    # must catch is a wrong merge, which moves logits by a share of the adapter's own effect
    # (~4 after 4 steps): asserted below against both scales, with margins of 5x and 50x.
    p = parse_params(raw)
    result = run_all(p, tmp_path)
    assert result["train"]["compute_dtype"] == "float32"  # CPU: fp32 compute for 4-bit
    metrics = result["eval"]
    assert metrics["tuned"]["perplexity"] < metrics["base"]["perplexity"]
    merge = result["merge"]
    assert merge["passed"]
    # the quantized base the adapter was trained on differs more than the fp32 merge does
    assert merge["max_abs_logit_diff_vs_quantized"] > merge["max_abs_logit_diff"]
    # The merge error is rounding (relative 1e-5: fp32 eps times the depth), and a merge that
    # lost or doubled even 0.1 % of B·A would move the logits by more than it does.
    task, tok = get_task(p.task), load_tokenizer(p)
    rows = datasets.load_from_disk(str(tmp_path / "tokenized"))["eval"]
    rows = rows.select(range(merge["probe_rows"])).remove_columns("length")
    probe = task.collator(tok, p)(list(rows))
    rt = resolve(p, load_config(p))
    model = load_with_adapter(p, rt, tmp_path / "adapter", tok.pad_token_id, quantized=False)
    tuned = _logits(model, probe)
    with model.disable_adapter():
        base = _logits(model, probe)
    effect = (tuned - base).abs().max().item()
    scale = tuned.abs().max().item()
    print(
        f"merge diff {merge['max_abs_logit_diff']:.3g}, adapter effect {effect:.3g}, "
        f"max |logit| {scale:.3g}"
    )
    assert merge["max_abs_logit_diff"] <= 1e-5 * scale
    assert merge["max_abs_logit_diff"] <= effect / 1000
