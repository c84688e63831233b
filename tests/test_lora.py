"""h = Wx + b + (alpha/r)·B·A·x, checked on real PEFT layers of a tiny BERT.

Which layers LoRA can target: Linear and GPT-2's Conv1D, by short name; a one-line refusal.
"""

import math
from types import SimpleNamespace

import datasets
import pytest
import torch
import yaml
from peft import get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    GPT2Config,
    GPT2LMHeadModel,
)

from lorapipe.config import UserError, parse_params
from lorapipe.evaluation import evaluate_model
from lorapipe.lora import check_target_modules, linear_layer_names, lora_config
from lorapipe.sections_model import LoraParams
from lorapipe.tasks import get_task, perplexity
from tests.conftest import ROOT


def lora_model(tiny_bert, r=8, alpha=16):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["lora"].update(r=r, alpha=alpha, dropout=0.0)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    return get_peft_model(base, lora_config(parse_params(raw)))


def test_b_starts_at_zero_and_only_a_b_head_train(tiny_bert):
    model = lora_model(tiny_bert)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        ("lora_A" in n or "lora_B" in n or "classifier" in n) for n in trainable
    )
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(p) == 0
        if "lora_A" in name:
            assert torch.count_nonzero(p) > 0


def test_forward_and_merge_follow_the_formula(tiny_bert):
    model = lora_model(tiny_bert, r=4, alpha=16)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = 16 / 4
    assert layer.scaling["default"] == scaling
    x = torch.randn(3, a.shape[1])
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ w.T + bias + scaling * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    merged_w = w + scaling * b @ a
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, merged_w)


class TableLM(torch.nn.Module):
    """A language model whose next-token logits depend only on the current token (a table)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Embedding.from_pretrained(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table(input_ids))


def nll_logits(nll: float) -> list[float]:
    """Logits over 2 tokens that give token 0 exactly this negative log-likelihood."""
    return [0.0, math.log(math.expm1(nll))]


def test_perplexity_is_token_weighted_not_a_mean_of_batch_means(tiny_llama):
    # From token 1 or 0 the next token 0 costs 2.0 nats, from token 2 it costs 0.5 nats.
    model = TableLM(torch.tensor([nll_logits(2.0), nll_logits(2.0), nll_logits(0.5)]))
    rows = datasets.Dataset.from_dict({"input_ids": [[1, 0, 0, 0, 0], [2, 0]]})
    rows = rows.map(
        lambda r: {"labels": r["input_ids"], "attention_mask": [1] * len(r["input_ids"])}
    )
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    task = get_task("causal_lm")
    # One row per batch: 4 targets at 2.0, then 1 target at 0.5.
    got = evaluate_model(model, rows, collator, task, batch_size=1)
    assert got["tokens"] == 5
    assert math.isclose(got["loss"], 8.5 / 5, rel_tol=1e-6)
    assert math.isclose(got["perplexity"], math.exp(8.5 / 5), rel_tol=1e-6)
    mean_of_batch_means = (2.0 + 0.5) / 2
    assert not math.isclose(got["perplexity"], math.exp(mean_of_batch_means), rel_tol=1e-3)
    # The same rows in one padded batch: padding is no target, the figure does not move.
    together = evaluate_model(model, rows, collator, task, batch_size=2)
    assert together["tokens"] == 5
    assert math.isclose(together["perplexity"], got["perplexity"], rel_tol=1e-6)


def test_perplexity_needs_a_target_token():
    assert math.isclose(perplexity(3.0, 2), math.exp(1.5))
    assert math.isclose(perplexity(2.0, 1), math.exp(2.0))  # one token is enough
    with pytest.raises(ValueError, match=r"^perplexity needs at least one target token$"):
        perplexity(0.0, 0)


@pytest.fixture(scope="module")
def gpt2():
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
    return GPT2LMHeadModel(config)


def test_conv1d_and_linear_layers_by_short_name(gpt2):
    # GPT-2's attention and MLP are transformers' Conv1D; only the head is an nn.Linear.
    assert linear_layer_names(gpt2) == ["c_attn", "c_fc", "c_proj", "lm_head"]


def test_missing_targets_are_named_with_the_real_ones(gpt2):
    check_target_modules(gpt2, LoraParams(target_modules=["c_attn", "c_proj"]))  # all exist
    with pytest.raises(UserError) as info:
        check_target_modules(gpt2, LoraParams(target_modules=["c_attn", "q_proj", "v_proj"]))
    assert str(info.value) == (
        "lora.target_modules: q_proj, v_proj match no layer of the model; "
        "its linear layers are: c_attn, c_fc, c_proj, lm_head"
    )


def test_lora_config_carries_the_params():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["lora"].update(r=4, alpha=12, dropout=0.25, target_modules=["key", "dense"])
    config = lora_config(parse_params(raw))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 12, 0.25)
    assert set(config.target_modules) == {"key", "dense"}  # not PEFT's default for the model
    assert config.task_type == "SEQ_CLS" and config.bias == "none"
