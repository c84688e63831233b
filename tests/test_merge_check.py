"""The merge verification: a merge that really differs is refused, and nothing is written."""

import json
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

from lorapipe.config import UserError, parse_params, stage_params
from lorapipe.lora import lora_config
from lorapipe.merge import merge
from lorapipe.modeling import load_with_adapter
from lorapipe.runtime import resolve
from lorapipe.tasks import get_task
from lorapipe.training import TRAIN_KEYS
from tests.conftest import ROOT

SENTENCES = ["a fine film", "dull", "not good at all, sadly", "a joy from start to end"] * 3


def params(model, tolerance=1e-4, probe_size=8, min_top1=0.99):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["name"] = str(model)
    raw["lora"]["dropout"] = 0.0
    raw["merge"].update(tolerance=tolerance, probe_size=probe_size, min_top1_agreement=min_top1)
    return parse_params(raw)


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    """A tokenized eval split and an adapter whose B is not zero (as after training)."""
    root = tmp_path_factory.mktemp("merge-check")
    p = params(tiny_bert)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rows = datasets.Dataset.from_dict({"sentence": SENTENCES, "label": [1, 0, 0, 1] * 3})
    eval_rows = get_task("seq_cls").tokenize(rows, tok, p, "data.eval")
    datasets.DatasetDict({"eval": eval_rows}).save_to_disk(str(root / "tokenized"))
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    # tiny_bert's head is drawn unseeded (session fixture) and small: logits of a fixed scale here.
    torch.nn.init.normal_(base.classifier.weight, std=1.0)
    model = get_peft_model(base, lora_config(p))
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=3.0)
    model.save_pretrained(root / "adapter")
    trained_with = stage_params(p, [*TRAIN_KEYS, "data.train", "data.eval"])
    (root / "adapter" / "lorapipe_params.json").write_text(json.dumps(trained_with))
    (root / "metrics.json").write_text(json.dumps({"trainable_params": 1}))
    return root


def run_merge(p, root, out):
    return merge(
        p,
        root / "tokenized",
        root / "adapter",
        out / "merged",
        out / "merge.json",
        root / "metrics.json",
    )


def doubled_scaling_diff(p, root) -> float:
    """Max |Δlogit| / max |logit| between the adapter at alpha/r and at 2·alpha/r, on the probe."""
    task, tok = get_task(p.task), AutoTokenizer.from_pretrained(p.model.name)
    rows = datasets.load_from_disk(str(root / "tokenized"))["eval"]
    rows = rows.select(range(min(p.merge.probe_size, len(rows)))).remove_columns("length")
    batch = task.collator(tok, p)(list(rows))
    batch.pop("labels")
    rt = resolve(p, AutoConfig.from_pretrained(p.model.name))
    model = load_with_adapter(p, rt, root / "adapter", tok.pad_token_id, quantized=False)
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
    result = run_merge(params(tiny_bert, 10.0, min_top1=0), trained, tmp_path / "a")
    assert result["passed"] and result["top1_agreement"] == 0.0  # relative difference 2 <= 10
    strict = params(tiny_bert, 10.0, min_top1=0.5)
    with pytest.raises(UserError, match="top-1 agreement"):
        run_merge(strict, trained, tmp_path / "b")


def test_the_probe_is_the_first_probe_size_eval_rows(trained, tiny_bert, tmp_path):
    assert run_merge(params(tiny_bert, probe_size=3), trained, tmp_path)["probe_rows"] == 3
    assert run_merge(params(tiny_bert, probe_size=99), trained, tmp_path)["probe_rows"] == 12


def test_a_causal_lm_merge_is_checked_on_its_own_collated_probe(tiny_llama, tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["task"], raw["model"]["name"] = "causal_lm", str(tiny_llama)
    raw["data"]["text_field"] = "text"
    raw["tokenize"].update(layout="pad", max_length=16)
    raw["lora"].update(dropout=0.0, target_modules=["q_proj", "v_proj"])
    p = parse_params(raw)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = datasets.Dataset.from_dict({"text": SENTENCES})
    eval_rows = get_task("causal_lm").tokenize(rows, tok, p, "data.eval")
    datasets.DatasetDict({"eval": eval_rows}).save_to_disk(str(tmp_path / "tokenized"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora_config(p))
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=1.0)
    model.save_pretrained(tmp_path / "adapter")
    trained_with = stage_params(p, [*TRAIN_KEYS, "data.train", "data.eval"])
    (tmp_path / "adapter" / "lorapipe_params.json").write_text(json.dumps(trained_with))
    (tmp_path / "metrics.json").write_text("{}")
    result = run_merge(p, tmp_path, tmp_path / "out")
    assert result["passed"] and result["max_abs_logit_diff"] < 1e-5
    assert "AutoModelForCausalLM" in (tmp_path / "out" / "merged" / "README.md").read_text()
