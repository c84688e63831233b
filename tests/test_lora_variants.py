"""LoRA variants (DoRA, rsLoRA, inits, LoRA+, patterns, all-linear, bias): trained, merged, counted.

Each variant runs the whole pipeline on the shrunk recipe models of test_recipes.py; the plan
counts what PEFT counts on a real model; what cannot apply fails in one line before weights load.
"""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)

from lorapipe import cli, plan
from lorapipe.card import model_card
from lorapipe.config import parse_params
from lorapipe.lora import lora_config, save_adapter, scaling
from lorapipe.model_sources import resolve_model
from lorapipe.pipeline import run_all
from lorapipe.recipes import recipe_params
from lorapipe.tasks import get_task
from lorapipe.training import TRAIN_KEYS, train
from tests.conftest import MINILM
from tests.test_recipes import CHAT, recipe_config, shrink, tiny_data
from tests.test_reliability import small_params

VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "loraplus": {"plus_lr_ratio": 16.0},
    "patterns": {"rank_pattern": {"value": 4}, "alpha_pattern": {"query": 32.0}},
    "all-linear+bias": {"target_modules": "all-linear", "bias": "all"},
}


def with_lora(p, **lora):
    raw = p.model_dump()
    raw["lora"].update(lora)
    return parse_params(raw)


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    """Params for a recipe on its shrunk random model, a few rows of its own data (cached)."""
    cache = {}

    def build(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            recipe = recipe_params(name)
            tok = AutoTokenizer.from_pretrained(resolve_model(MINILM))
            tok.eos_token, tok.chat_template = tok.sep_token, CHAT
            config = shrink(recipe_config(name), len(tok))
            get_task(recipe.task).auto_model.from_config(config).save_pretrained(folder / "model")
            tok.save_pretrained(folder / "model")
            raw = recipe.model_dump()
            data = tiny_data(recipe.task, folder)
            raw["model"]["name"] = str(folder / "model")
            raw["data"].update(train=data, eval=data, max_train_rows=None, max_eval_rows=None)
            raw["tokenize"]["max_length"] = min(raw["tokenize"]["max_length"], 64)
            raw["train"].update(
                epochs=1, max_steps=2, batch_size=4, save_steps=1, logging_steps=1, eval_steps=1
            )
            raw["evaluate"].update(num_samples=1, max_new_tokens=4)
            cache[name] = parse_params(raw, name)
        return cache[name]

    return build


def peft_counts(p):
    """What PEFT counts on the real (tiny) model, as training builds it."""
    task = get_task(p.task)
    base = task.auto_model.from_pretrained(p.model.name, **task.model_kwargs(p.data.num_labels))
    return get_peft_model(base, lora_config(p)).get_nb_trainable_parameters()


@pytest.mark.parametrize(
    "recipe, variant",
    [("sst2-bert-base", v) for v in VARIANTS]
    + [("wikitext2-qwen-qlora", v) for v in ("dora", "rslora", "loraplus", "all-linear+bias")],
)
def test_variant_trains_merges_and_is_counted(shrunk, tmp_path, recipe, variant):
    p = with_lora(shrunk(recipe), **VARIANTS[variant])
    result = run_all(p, tmp_path)
    assert result["train"]["global_steps"] == 2
    assert result["merge"]["passed"]
    assert list((tmp_path / "reports/figures").glob("*.png"))
    counted = plan.count_trainable(
        AutoConfig.from_pretrained(p.model.name), lora_config(p), p.task, p.data.num_labels
    )
    trained = (result["train"]["trainable_params"], result["train"]["all_params"])
    assert (counted["trainable"], counted["all"]) == trained


@pytest.mark.parametrize("variant", ["plain", *VARIANTS])
def test_plan_counts_what_peft_counts(tiny_bert, variant):
    p = with_lora(small_params(str(tiny_bert)), **VARIANTS.get(variant, {}))
    counted = plan.count_trainable(
        AutoConfig.from_pretrained(tiny_bert), lora_config(p), p.task, p.data.num_labels
    )
    assert (counted["trainable"], counted["all"]) == peft_counts(p)


def test_dora_adds_a_magnitude_per_wrapped_layer_and_rslora_adds_nothing(tiny_bert):
    p = small_params(str(tiny_bert))
    config = AutoConfig.from_pretrained(tiny_bert)

    def count(**lora):
        return plan.count_trainable(config, lora_config(with_lora(p, **lora)), "seq_cls")

    plain, dora, rs = count(), count(use_dora=True), count(use_rslora=True)
    # query and value in each of the 2 layers: one magnitude per output feature (hidden 32).
    assert dora["trainable"] - plain["trainable"] == 2 * 2 * config.hidden_size
    assert dora["lora_per_module"] == {"query": 2 * (8 * 64 + 32), "value": 2 * (8 * 64 + 32)}
    assert rs == plain


def test_rslora_scaling_in_peft_and_in_the_card(tiny_bert):
    p = with_lora(small_params(str(tiny_bert)), r=4, alpha=16, use_rslora=True)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert), lora_config(p)
    )
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.scaling["default"] == scaling(p.lora) == 16 / 2
    from lorapipe.config import stage_params

    card = model_card("t", stage_params(p, TRAIN_KEYS), {}, "")
    assert "scaling alpha/√r = 8, rsLoRA" in card
    plain = model_card("t", stage_params(with_lora(p, use_rslora=False), TRAIN_KEYS), {}, "")
    assert "scaling alpha/r = 4" in plain


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_adapter_applies_to_the_original_base(tiny_bert, tmp_path, init):
    p = with_lora(small_params(str(tiny_bert)), init=init, dropout=0.0)
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert), lora_config(p)
    )
    model.save_pretrained(tmp_path / "initial")
    with torch.no_grad():  # stands in for training: A, B and the classifier head all move
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    model.eval()
    x = torch.randint(1000, 2000, (3, 12))
    trained = model(input_ids=x).logits
    save_adapter(model, tmp_path / "adapter", tmp_path / "initial")

    original = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    reloaded = PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(input_ids=x).logits, trained, atol=1e-5, rtol=0)

    # The base stays W, not W_res: evaluate's base metric (adapter disabled) is the real base.
    def query_weight(peft_model):
        return peft_model.base_model.model.bert.encoder.layer[0].attention.self.query.weight

    w = AutoModelForSequenceClassification.from_pretrained(tiny_bert).bert.encoder.layer[0]
    w = w.attention.self.query.weight
    assert torch.equal(query_weight(reloaded), w)
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["r"] == 16
    # A plain save re-runs the init on load: right with the adapter, but the base it leaves is
    # W_res = W - s·B0·A0, so "base" (adapter disabled) would be a model that never existed.
    model.save_pretrained(tmp_path / "plain")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    plain = PeftModel.from_pretrained(base, tmp_path / "plain").eval()
    assert (query_weight(plain) - w).norm() > 0.1 * w.norm()


REFUSED = [
    ({"lora.init": "pissa", "quant.bits": 4}, "lora.init: pissa needs full-precision"),
    ({"lora.init": "olora", "quant.bits": 8}, "lora.init: olora needs full-precision"),
    ({"lora.init": "loftq"}, "lora.init: loftq is not supported"),
    ({"lora.init": "pissa", "lora.use_dora": True}, "lora.use_dora: cannot combine"),
    ({"lora.init": "olora", "lora.bias": "all"}, "lora.bias: all cannot combine"),
    (
        {"lora.init": "pissa", "lora.use_rslora": True, "lora.rank_pattern": {"query": 4}},
        "lora.use_rslora: PEFT cannot convert",
    ),
    ({"lora.rank_pattern": {"key": 4}}, "lora.rank_pattern: 'key' matches no targeted layer"),
    ({"lora.alpha_pattern": {"q_proj": 4}}, "lora.alpha_pattern: 'q_proj' matches no"),
]


@pytest.mark.parametrize("overrides, message", REFUSED)
def test_check_refuses_in_one_line_before_weights_load(
    tiny_bert, tmp_path, monkeypatch, capsys, overrides, message
):
    import yaml

    raw = small_params(str(tiny_bert)).model_dump()
    for key, value in overrides.items():
        section, field = key.split(".")
        raw[section][field] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_weights)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check", "--params", str(tmp_path / "params.yaml")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


class Killed(Exception):
    pass


class Recorder(TrainerCallback):
    """Per step: each param group's lr; raises at `stop_at` (a killed run)."""

    def __init__(self, stop_at=None):
        self.stop_at, self.lrs = stop_at, []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append([g["lr"] for g in optimizer.param_groups if g["params"]])
        if state.global_step == self.stop_at:
            raise Killed


def test_loraplus_groups_schedule_and_resume(tiny_bert, tmp_path):
    from lorapipe.data import tokenize

    # pissa too: its initial adapter must survive the kill for the resumed run's conversion.
    p = with_lora(
        small_params(str(tiny_bert), max_steps=6, save_steps=2, warmup_ratio=0.2),
        plus_lr_ratio=16.0,
        init="pissa",
    )
    tokenize(p, tmp_path / "tok")
    runs = {}
    for name in ("straight", "killed"):
        root = tmp_path / name
        rec = Recorder(stop_at=3 if name == "killed" else None)
        args = (p, tmp_path / "tok", root / "adapter", root / "ckpt", root / "reports")
        if name == "killed":
            with pytest.raises(Killed):
                train(*args, root / ".work", callbacks=[rec])
            rec = Recorder()
        train(*args, root / ".work", callbacks=[rec])
        runs[name] = (root, rec)
    straight = runs["straight"][1].lrs
    # Groups: A (+ head weights) at lr, B and 1-d params at 16 × lr, every step.
    for a, *bs in straight:
        assert bs and all(b == pytest.approx(16 * a) for b in bs)
    peak = max(lrs[0] for lrs in straight)
    assert peak == pytest.approx(p.train.learning_rate, rel=0.2)
    assert straight[-1][0] == 0.0  # linear decay to 0 at the last step
    timing = json.loads((runs["killed"][0] / "reports/timing.json").read_text())
    assert timing["resumed_from_step"] == 2
    assert runs["killed"][1].lrs == straight[2:]
    weights = [load_file(r / "adapter/adapter_model.safetensors") for r, _ in runs.values()]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-6, rtol=0)
