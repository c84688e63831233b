"""Which layers LoRA can target: Linear and GPT-2's Conv1D, by short name; a one-line refusal."""

import pytest
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from lorapipe.config import LoraParams, UserError, parse_params
from lorapipe.lora import check_target_modules, linear_layer_names, lora_config
from tests.conftest import ROOT


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
