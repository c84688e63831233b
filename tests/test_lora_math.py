"""h = Wx + b + (alpha/r)·B·A·x, checked on real PEFT layers of a tiny BERT."""

import math

import torch
import yaml
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification

from lorapipe.config import parse_params
from lorapipe.lora import lora_config
from lorapipe.metrics import perplexity
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


def test_perplexity_is_token_weighted_not_a_mean_of_batch_means():
    batches = [(torch.tensor([2.0, 2.0, 2.0, 2.0]),), (torch.tensor([0.5]),)]
    nll = sum(b[0].sum().item() for b in batches)
    tokens = sum(len(b[0]) for b in batches)
    assert math.isclose(perplexity(nll, tokens), math.exp(8.5 / 5))
    mean_of_means = (2.0 + 0.5) / 2
    assert not math.isclose(perplexity(nll, tokens), math.exp(mean_of_means))
