from pathlib import Path

import pytest
import yaml

from lorapipe.config import UserError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def base() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def with_value(key: str, value) -> dict:
    raw = base()
    section, name = key.split(".")
    raw[section][name] = value
    return raw


def test_shipped_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert (p.lora.r, p.lora.alpha, p.lora.target_modules) == (8, 16, ["query", "value"])


def test_yaml_scientific_notation_string_is_a_float():
    # YAML 1.1 reads 1e-4 (no dot) as a string; the schema still takes it as a number.
    assert parse_params(with_value("train.learning_rate", "1e-4")).train.learning_rate == 1e-4


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lora.r", 0, "lora.r: Input should be greater than 0"),
        ("lora.alpha", -1, "lora.alpha: Input should be greater than 0"),
        ("lora.dropout", 1.0, "lora.dropout: Input should be less than 1"),
        ("train.learning_rate", 0, "train.learning_rate: Input should be greater than 0"),
        ("train.batch_size", 0, "train.batch_size: Input should be greater than 0"),
        ("quant.bits", 3, "quant.bits: Input should be 4, 8 or 'none'"),
        ("lora.target_modules", [], "lora.target_modules: List should have at least 1 item"),
    ],
)
def test_bad_values_name_the_field(key, value, message):
    with pytest.raises(UserError) as err:
        parse_params(with_value(key, value))
    assert str(err.value).startswith(f"params.yaml: {message}")
    assert "\n" not in str(err.value)


def test_unknown_key_suggests_the_closest():
    raw = base()
    raw["lora"]["rank"] = 4
    with pytest.raises(UserError, match=r"lora.rank: unknown key \(did you mean 'lora.r'\?\)"):
        parse_params(raw)


def test_unknown_section_is_refused():
    raw = base()
    raw["trian"] = {}
    with pytest.raises(UserError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        parse_params(raw)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("lora:\n  r: [8\n")
    with pytest.raises(UserError, match=r"params.yaml: line \d+: malformed YAML"):
        load_params(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_fp16_with_quantized_base_is_refused():
    raw = with_value("quant.bits", 4)
    raw["train"]["mixed_precision"] = "fp16"
    with pytest.raises(UserError, match=r"train\.mixed_precision"):
        parse_params(raw)


def test_dvc_yaml_lists_exactly_the_keys_each_stage_reads():
    from lorapipe.data import TOKENIZE_KEYS
    from lorapipe.evaluation import EVAL_KEYS
    from lorapipe.merge import MERGE_KEYS
    from lorapipe.training import TRAIN_KEYS

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    expected = {
        "tokenize": TOKENIZE_KEYS,
        "train": TRAIN_KEYS,
        "evaluate": EVAL_KEYS,
        "merge": MERGE_KEYS,
    }
    for name, keys in expected.items():
        assert stages[name]["params"] == keys, name
    shipped = load_params(ROOT / "params.yaml").model_dump()
    for keys in expected.values():
        for key in keys:
            node = shipped
            for part in key.split("."):
                node = node[part]  # every listed key exists in params.yaml


def test_duplicate_key_names_the_key_and_both_lines(tmp_path):
    # PyYAML keeps the last `r` silently; the stages must not train with a value nobody chose.
    text = (ROOT / "params.yaml").read_text().replace("  r: 8\n", "  r: 8\n  r: 4\n")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    line = text.splitlines().index("  r: 8") + 1
    with pytest.raises(UserError) as err:
        load_params(path)
    assert (
        str(err.value) == f"{path}: lora.r: duplicate key (lines {line} and {line + 1}); keep one"
    )


@pytest.mark.parametrize(
    ("section", "meant"),
    [("lora_config", "lora"), ("training_args", "train"), ("quantization", "quant")],
)
def test_misspelt_section_suggests_the_section_it_contains(section, meant):
    raw = base()
    raw[section] = {}
    with pytest.raises(UserError, match=rf"{section}: unknown key \(did you mean '{meant}'\?\)"):
        parse_params(raw)


def test_every_invalid_field_is_reported_one_line_each():
    raw = with_value("train.batch_size", 0)
    raw["train"]["grad_accum"] = -1
    raw["lora_config"] = {"r": 4}
    with pytest.raises(UserError) as err:
        parse_params(raw)
    assert str(err.value).splitlines() == [
        "params.yaml: train.batch_size: Input should be greater than 0 (got 0)",
        "params.yaml: train.grad_accum: Input should be greater than 0 (got -1)",
        "params.yaml: lora_config: unknown key (did you mean 'lora'?)",
    ]


def test_params_not_utf8_names_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"task: seq_cls\nmodel:\n  name: caf\xe9\n")
    with pytest.raises(UserError, match=r"params.yaml: not UTF-8 text \(line 3, column 12\)"):
        load_params(path)
