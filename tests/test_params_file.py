"""params.yaml is rendered from the schema: every key, its value and description, task marks;
`lorapipe params explain` tells one key."""

from __future__ import annotations

import difflib
import subprocess

import pytest
import yaml

from lorapipe.cli import main
from lorapipe.config import UserError, load_params, parse_params
from lorapipe.params_file import (
    TASKS,
    allowed_text,
    explain,
    key_tasks,
    render,
    schema_fields,
    stages_reading,
)
from lorapipe.recipes import DEFAULT_RECIPE, apply_recipe, list_recipes, recipe_params, recipe_text
from tests.conftest import ROOT

REGENERATE = f"lorapipe recipe apply {DEFAULT_RECIPE}"


def test_params_yaml_is_the_rendered_default_recipe():
    shipped = (ROOT / "params.yaml").read_text(encoding="utf-8")
    rendered = recipe_text(DEFAULT_RECIPE)
    diff = difflib.unified_diff(
        shipped.splitlines(), rendered.splitlines(), "params.yaml", "rendered", lineterm="", n=0
    )
    assert shipped == rendered, (
        f"params.yaml differs from what the schema (src/lorapipe/sections_*.py) and recipe "
        f"{DEFAULT_RECIPE} render; regenerate it with `{REGENERATE}` (--force if params.yaml "
        "has edits of its own, kept as params.yaml.bak):\n" + "\n".join(list(diff)[:20])
    )


def test_rendered_default_loads_to_the_shipped_params():
    rendered = recipe_text(DEFAULT_RECIPE)
    assert parse_params(yaml.safe_load(rendered)) == load_params(ROOT / "params.yaml")


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_recipe_renders_to_a_file_that_loads_back(name):
    p = recipe_params(name)
    assert parse_params(yaml.safe_load(render(p))) == p


def test_every_key_has_a_one_line_description():
    for key, field in schema_fields().items():
        text = field.description or ""
        assert text.strip() and "\n" not in text and len(text) <= 120, key


def test_task_marks_name_tasks_and_show_beside_their_keys():
    for key, field in schema_fields().items():
        assert set(key_tasks(field)) <= set(TASKS), key
    lines = recipe_text(DEFAULT_RECIPE).splitlines()

    def line(key: str) -> str:
        return next(x for x in lines if x.startswith(f"  {key}:"))

    assert line("format").endswith("# sft only")
    assert line("stride").endswith("# causal_lm only")
    assert line("text_field").endswith("# seq_cls, causal_lm only")
    assert line("r") == "  r: 8"  # read by every task: no mark
    assert "# --- lora --- " in "\n".join(lines)
    assert lines[lines.index("  r: 8") - 1].startswith("  # Rank: ")


def test_text_with_line_breaks_stays_on_one_line():
    p = recipe_params("sft-prompt-response")
    text = render(p)
    line = next(x for x in text.splitlines() if x.startswith("  separator:"))
    assert line.startswith('  separator: "\\n### Response:\\n"  ')
    assert parse_params(yaml.safe_load(text)).data.separator == "\n### Response:\n"


def test_apply_writes_through_the_renderer(tmp_path):
    target = tmp_path / "params.yaml"
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    apply_recipe("sst2-smollm2-generate", target)
    text = target.read_text(encoding="utf-8")
    assert text == recipe_text("sst2-smollm2-generate")
    assert text.startswith("# recipe: sst2-smollm2-generate — ")
    assert "# Written by `lorapipe recipe apply sst2-smollm2-generate`" in text
    assert load_params(target) == recipe_params("sst2-smollm2-generate")


def test_explain_tells_default_value_allowed_tasks_and_stages():
    lines = explain("train.learning_rate", ROOT / "params.yaml").splitlines()
    assert lines[0] == f"train.learning_rate: {schema_fields()['train.learning_rate'].description}"
    assert "  default:  0.0005" in lines  # the schema's
    assert any(x.startswith("  value:    0.001 (") for x in lines)  # params.yaml's
    assert "  allowed:  a number > 0" in lines
    assert "  tasks:    every task" in lines
    assert any(x.startswith("  stages:   train (") for x in lines)


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("lora.init", "one of true, kaiming, gaussian, pissa, olora, loftq"),
        ("merge.min_top1_agreement", "auto or a number >= 0 and <= 1"),
        ("data.eval_fraction", "a number > 0 and < 1"),
        ("train.num_processes", "auto or an integer > 0"),
        ("data.max_train_rows", "an integer > 0 or null"),
        ("lora.target_modules", "a list of text (at least 1)"),
        ("lora.rank_pattern", "a mapping of text to an integer > 0"),
        ("data.chat_template", "true or false"),
    ],
)
def test_allowed_values_come_from_the_type(key, allowed):
    field = schema_fields()[key]
    assert allowed_text(field.annotation, list(field.metadata)) == allowed


def test_explain_names_every_stage_listing_a_key():
    text = explain("evaluate.stride", ROOT / "params.yaml")
    assert "  tasks:    causal_lm only" in text.splitlines()
    assert "  stages:   evaluate, merge (" in text
    assert "  stages:   none (" in explain("hub.push", ROOT / "params.yaml")


def test_stages_reading_takes_dvc_forms(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(
        "stages:\n"
        "  a: {cmd: x, params: [lora.r]}\n"
        "  b: {cmd: x, params: [lora]}\n"
        "  c: {cmd: x, params: [{params.yaml: [lora.alpha]}]}\n"
        "  d: {cmd: x, params: [{params.yaml: null}]}\n"
        "  e: {cmd: x, params: [{other.yaml: [lora.r]}]}\n"
    )
    assert stages_reading("lora.r", dvc_yaml) == ["a", "b", "d"]
    assert stages_reading("lora", dvc_yaml) == ["a", "b", "c", "d"]


def test_explain_unknown_key_names_the_closest():
    with pytest.raises(UserError) as err:
        explain("lora.rank", ROOT / "params.yaml")
    assert str(err.value) == "lora.rank: unknown key (did you mean 'lora.r'?)"


def test_cli_params_explain(capsys):
    main(["params", "explain", "lora.r", "--params", str(ROOT / "params.yaml")])
    out = capsys.readouterr().out
    assert out.startswith("lora.r: Rank: ") and "  default:  8\n" in out
    with pytest.raises(SystemExit) as code:
        main(["params", "explain", "trian.seed", "--params", str(ROOT / "params.yaml")])
    assert code.value.code == 2
    assert capsys.readouterr().err == (
        "error: trian.seed: unknown key (did you mean 'train.seed'?)\n"
    )
