"""The merge verification: a merge that really differs is refused, and nothing is written."""

import json
import math
import re

import datasets
import pytest
import torch
import yaml
from peft import get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTuner
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from lorapipe import merge as merge_module
from lorapipe.config import UserError, parse_params, stage_params
from lorapipe.lora import lora_config
from lorapipe.merge import merge
from lorapipe.merge_check import MAX_EFFECT_SHARE, compare_logits
from lorapipe.modeling import load_with_adapter
from lorapipe.runtime import resolve
from lorapipe.tasks import IGNORE, get_task
from lorapipe.training import TRAIN_KEYS
from tests.conftest import ROOT

SENTENCES = ["a fine film", "dull", "not good at all, sadly", "a joy from start to end"] * 3


def params(model, tolerance=1e-4, probe_size=8, min_top1=0.99, bits="none"):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["name"] = str(model)
    raw["quant"]["bits"] = bits
    if "llama" in str(model):
        raw["lora"]["target_modules"] = ["q_proj", "v_proj"]
    raw["lora"]["dropout"] = 0.0
    raw["merge"].update(tolerance=tolerance, probe_size=probe_size, min_top1_agreement=min_top1)
    return parse_params(raw)


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    return make_trained(tiny_bert, tmp_path_factory.mktemp("merge-check"))


@pytest.fixture(scope="module")
def wide_bert(tiny_bert, tmp_path_factory):
    """tiny_bert 64 wide: bitsandbytes' CPU 4-bit kernels need rows of at least 64 (a block)."""
    out = tmp_path_factory.mktemp("wide-bert")
    config = AutoConfig.from_pretrained(tiny_bert)
    config.update({"hidden_size": 64, "intermediate_size": 128})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_without_pad(tiny_llama, tmp_path_factory):
    """A Llama classifier whose config has no pad id, as Llama 3's: it scores each row's last
    non-pad token, so it needs one (the tokenizer's), or a batch of two rows fails. 64 wide, as
    bitsandbytes' CPU 4-bit kernels need."""
    out = tmp_path_factory.mktemp("llama-no-pad")
    config = AutoConfig.from_pretrained(tiny_llama)
    config.update(
        {"pad_token_id": None, "hidden_size": 64, "intermediate_size": 128, "head_dim": 32}
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


def make_trained(base_dir, root, b_std=3.0):
    """A tokenized eval split and an adapter whose B is not zero (as after training)."""
    p = params(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = datasets.Dataset.from_dict({"sentence": SENTENCES, "label": [1, 0, 0, 1] * 3})
    eval_rows = get_task("seq_cls").tokenize(rows, tok, p, "data.eval")
    datasets.DatasetDict({"eval": eval_rows}).save_to_disk(str(root / "tokenized"))
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    # A head drawn here, and larger than transformers' init: logits of a fixed scale.
    torch.nn.init.normal_(getattr(base, "classifier", getattr(base, "score", None)).weight, std=1.0)
    save_as_trained(get_peft_model(base, lora_config(p)), p, root, b_std, {"trainable_params": 1})
    return root


def save_as_trained(model, p, root, b_std, metrics):
    """What the merge stage reads after training: the adapter, with B drawn (zero before any
    training), the params it was trained with, and the train metrics."""
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=b_std)
    model.save_pretrained(root / "adapter")
    trained_with = stage_params(p, [*TRAIN_KEYS, "data.train", "data.eval"])
    (root / "adapter" / "lorapipe_params.json").write_text(json.dumps(trained_with))
    (root / "metrics.json").write_text(json.dumps(metrics))


def run_merge(p, root, out):
    return merge(
        p,
        root / "tokenized",
        root / "adapter",
        out / "merged",
        out / "merge.json",
        root / "metrics.json",
    )


def probe_batch(p, root) -> dict:
    """The merge check's probe: the first probe_size eval rows, collated, without labels."""
    tok = AutoTokenizer.from_pretrained(p.model.name)
    rows = datasets.load_from_disk(str(root / "tokenized"))["eval"]
    rows = rows.select(range(min(p.merge.probe_size, len(rows)))).remove_columns("length")
    batch = get_task(p.task).collator(tok, p)(list(rows))
    batch.pop("labels")
    return batch


def adapter_model(p, root, quantized):
    rt = resolve(p, AutoConfig.from_pretrained(p.model.name))
    pad = AutoTokenizer.from_pretrained(p.model.name).pad_token_id
    return load_with_adapter(p, rt, root / "adapter", pad, quantized=quantized)


def doubled_scaling_diff(p, root) -> float:
    """Max |Δlogit| / max |logit| between the adapter at alpha/r and at 2·alpha/r, on the probe."""
    batch, model = probe_batch(p, root), adapter_model(p, root, quantized=False)
    with torch.no_grad():
        right = model(**batch).logits
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.scaling["default"] *= 2
        wrong = model(**batch).logits
    return ((wrong - right).abs().max() / right.abs().max()).item()


def double_the_merged_delta(monkeypatch):
    """A merge with the wrong scaling: W + 2·(alpha/r)·B·A folded into the weights."""
    get_delta_weight = LoraLinear.get_delta_weight
    monkeypatch.setattr(
        LoraLinear, "get_delta_weight", lambda self, adapter: 2 * get_delta_weight(self, adapter)
    )


def test_a_correct_merge_passes_well_within_the_tolerance(trained, tiny_bert, tmp_path):
    result = run_merge(params(tiny_bert), trained, tmp_path)
    assert result["passed"] and result["max_abs_logit_diff"] < 1e-5
    assert result["probe_rows"] == 8 and result["tolerance"] == 1e-4
    assert json.loads((tmp_path / "merge.json").read_text()) == result
    assert "max_abs_logit_diff_vs_quantized" not in result  # full precision: no 4-bit base
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "\n# Merged LoRA model\n" in card
    shown = json.loads(card.split("## Metrics\n\n```json\n")[1].split("```")[0])
    assert shown == {"train": {"trainable_params": 1}, "merge": result}
    assert f"from_pretrained('{tmp_path / 'merged'}')" in card


@pytest.mark.parametrize("previous", [False, True])
def test_a_wrong_merge_is_refused_says_by_how_much_and_writes_nothing(
    trained, tiny_bert, tmp_path, monkeypatch, previous
):
    p = params(tiny_bert)
    expected = doubled_scaling_diff(p, trained)
    assert expected > 1e-2  # a real difference, far above the tolerance
    if previous:  # the outputs of an earlier run must survive a refused merge untouched
        (tmp_path / "merged").mkdir()
        (tmp_path / "merged" / "config.json").write_text("earlier")
        (tmp_path / "merge.json").write_text("earlier")
    double_the_merged_delta(monkeypatch)
    with pytest.raises(UserError) as info:
        run_merge(p, trained, tmp_path)
    message = str(info.value)
    assert "\n" not in message and "merge.tolerance" in message
    assert message.endswith("; nothing was written")
    said = float(re.search(r"difference ([0-9.e+-]+)", message).group(1))
    assert said == pytest.approx(expected, rel=1e-2)
    left = sorted(x.name for x in tmp_path.iterdir())
    if previous:
        assert left == ["merge.json", "merged"]
        assert (tmp_path / "merge.json").read_text() == "earlier"
        assert [x.name for x in (tmp_path / "merged").iterdir()] == ["config.json"]
        assert (tmp_path / "merged" / "config.json").read_text() == "earlier"
    else:
        assert left == []  # no merged folder, no report, no temporary sibling


def test_the_tolerance_decides(trained, tiny_bert, tmp_path, monkeypatch):
    """Just above the measured difference passes, just below refuses."""
    monkeypatch.setitem(MAX_EFFECT_SHARE, torch.float32, 10.0)  # the tolerance alone decides
    double_the_merged_delta(monkeypatch)
    diff = doubled_scaling_diff(params(tiny_bert), trained)
    result = run_merge(params(tiny_bert, diff * 1.01, min_top1=0), trained, tmp_path / "a")
    assert result["passed"] and result["max_rel_logit_diff"] == pytest.approx(diff, rel=1e-3)
    with pytest.raises(UserError):
        run_merge(params(tiny_bert, diff * 0.99, min_top1=0), trained, tmp_path / "b")


def test_top1_agreement_decides_too(trained, tiny_bert, tmp_path, monkeypatch):
    # A merge that negates the head: logits become -logits, so every one of the two-class
    # predictions flips, whatever the random weights (a reversed delta flipped some draws only).
    unload = BaseTuner.merge_and_unload

    def negated_head(self, *args, **kwargs):
        model = unload(self, *args, **kwargs)
        with torch.no_grad():
            model.classifier.weight.neg_()
            model.classifier.bias.neg_()
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", negated_head)
    monkeypatch.setitem(MAX_EFFECT_SHARE, torch.float32, 10.0)  # the top-1 check alone decides
    result = run_merge(params(tiny_bert, 10.0, min_top1=0), trained, tmp_path / "a")
    assert result["passed"] and result["top1_agreement"] == 0.0  # relative difference 2 <= 10
    strict = params(tiny_bert, 10.0, min_top1=0.5)
    with pytest.raises(UserError, match="top-1 agreement"):
        run_merge(strict, trained, tmp_path / "b")


def test_the_probe_is_the_first_probe_size_eval_rows(trained, tiny_bert, tmp_path):
    assert run_merge(params(tiny_bert, probe_size=3), trained, tmp_path)["probe_rows"] == 3
    assert run_merge(params(tiny_bert, probe_size=99), trained, tmp_path)["probe_rows"] == 12


@pytest.mark.parametrize("perplexity", ["blocks", "sliding_window"])
def test_a_causal_lm_merge_is_checked_on_its_own_collated_probe(tiny_llama, tmp_path, perplexity):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["task"], raw["model"]["name"] = "causal_lm", str(tiny_llama)
    raw["data"]["text_field"] = "text"
    raw["tokenize"].update(layout="pad", max_length=16)
    raw["lora"].update(dropout=0.0, target_modules=["q_proj", "v_proj"])
    raw["evaluate"]["perplexity"] = perplexity
    p = parse_params(raw)
    task, tok = get_task("causal_lm"), AutoTokenizer.from_pretrained(tiny_llama)
    rows = datasets.Dataset.from_dict({"text": SENTENCES})
    splits = {"eval": task.tokenize(rows, tok, p, "data.eval")}
    if perplexity == "sliding_window":
        splits["eval_stream"] = task.stream(rows, tok, p, "data.eval")
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "tokenized"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora_config(p))
    save_as_trained(model, p, tmp_path, 1.0, {})
    result = run_merge(p, tmp_path, tmp_path / "out")
    assert result["passed"] and result["max_abs_logit_diff"] < 1e-5
    assert result["effect_share"] < 1e-4  # fp32 rounding over a visible effect
    assert "AutoModelForCausalLM" in (tmp_path / "out" / "merged" / "README.md").read_text()
    # The merged model scored as evaluate scores: every target token once, of the same set.
    merged = result["merged"]
    if perplexity == "blocks":
        targets = sum(sum(x != IGNORE for x in labels[1:]) for labels in splits["eval"]["labels"])
    else:  # one stream: every token but the first
        targets = sum(len(x) for x in splits["eval_stream"]["input_ids"]) - 1
    assert merged["metric"] == "perplexity" and merged["tokens"] == targets
    assert merged["perplexity"] == pytest.approx(math.exp(merged["loss"]))


def test_the_report_says_what_was_compared_and_each_phase_is_announced(
    trained, tiny_bert, tmp_path, capsys, monkeypatch
):
    sizes = []
    real = merge_module.merge_runtime
    monkeypatch.setattr(
        merge_module,
        "merge_runtime",
        lambda rt, dtype, size: sizes.append((dtype, size)) or real(rt, dtype, size),
    )
    result = run_merge(params(tiny_bert), trained, tmp_path)
    # Where the merge runs is decided by the base's bytes, known from its config alone.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    assert sizes == [(torch.float32, 4 * sum(t.numel() for t in base.parameters()))]
    cpu = {"device": "cpu", "dtype": "float32"}
    assert result["expected"] == {"model": "base + adapter, unmerged", **cpu}
    assert result["merged"].items() >= {"model": "the saved merged folder, reloaded", **cpu}.items()
    assert result["min_top1_agreement"] == 0.99 and "quantized" not in result
    assert json.loads((tmp_path / "merge.json").read_text()) == result
    said = [re.sub(r" \(at \d+:\d\d\)$", "", x) for x in capsys.readouterr().out.splitlines()]
    assert said == [
        "merge 1/4: loading base + adapter (full precision)",
        "merge 2/4: merging W + (alpha/r)·B·A",
        "merge 3/4: saving",
        "merge 4/4: verifying the saved model",
    ]


def test_a_4_bit_run_merges_in_full_precision_and_reports_the_gap_to_its_4_bit_base(
    wide_bert, tmp_path
):
    trained = make_trained(wide_bert, tmp_path / "trained")
    p = params(wide_bert, bits=4)
    result = run_merge(p, trained, tmp_path / "out")
    assert result["passed"] and result["expected"]["dtype"] == "float32"
    assert result["quantized"] == {
        "model": "k-bit base + adapter (as trained)",
        "device": "cpu",
        "dtype": "float32",
    }
    saved = json.loads((tmp_path / "out" / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved  # merged into the full-precision base
    batch = probe_batch(p, trained)
    with torch.no_grad():
        full = adapter_model(p, trained, quantized=False)(**batch).logits
        four_bit = adapter_model(p, trained, quantized=True)(**batch).logits
    gap = (four_bit - full).abs().max().item()
    assert gap > 1e-3  # NF4 moves the logits: the reported gap is that, not zero
    assert result["max_abs_logit_diff_vs_quantized"] == pytest.approx(gap, rel=1e-4)


def test_compare_logits_is_relative_to_the_largest_expected_logit():
    expected = torch.tensor([[0.5, -0.25], [0.1, 0.2]])  # |logit| under 1: the ratio matters
    got = expected + torch.tensor([[0.05, 0.0], [0.0, -0.3]])  # row 2's argmax flips
    assert compare_logits(expected, got) == pytest.approx(
        {"max_abs_logit_diff": 0.3, "max_rel_logit_diff": 0.6, "top1_agreement": 0.5}
    )


def test_a_causal_probe_scores_only_its_target_tokens():
    logits = torch.arange(24.0).reshape(2, 3, 4)
    labels = torch.tensor([[IGNORE, 5, 6], [7, IGNORE, IGNORE]])
    scored = merge_module._scored(logits, {"labels": labels})
    assert torch.equal(scored, torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]]))
    rows = torch.ones(3, 2)  # a classifier's: one row per example, kept as it is
    assert merge_module._scored(rows, {"labels": torch.tensor([0, 1, 1])}) is rows


@pytest.mark.parametrize("bits", ["none", 4])  # 4: the quantized side is loaded with it too
def test_a_classifier_without_a_pad_id_is_merged_with_the_tokenizers(
    llama_without_pad, tmp_path, bits
):
    trained = make_trained(llama_without_pad, tmp_path / "trained")
    result = run_merge(params(llama_without_pad, bits=bits), trained, tmp_path / "out")
    assert result["passed"] and result["probe_rows"] == 8
    assert ("max_abs_logit_diff_vs_quantized" in result) == (bits == 4)
    saved = json.loads((tmp_path / "out" / "merged" / "config.json").read_text())
    pad = AutoTokenizer.from_pretrained(llama_without_pad).pad_token_id
    assert pad is not None and saved["pad_token_id"] == pad  # the merged model alone works too
