"""A complete params file rendered from the schema, and one key explained.

lorapipe.sections_model and sections_run hold every key's default and description, and which
tasks read it; a recipe holds what differs from the defaults. `render` writes every key with
its value, its description above it and a `# <task> only` mark beside it; `explain` tells one
key's meaning, default, current value, allowed values and the dvc.yaml stages that read it.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from lorapipe.config import Params, UserError, _suggest, load_params

TASKS: tuple[str, ...] = get_args(Params.model_fields["task"].annotation)


def _section(field: FieldInfo) -> type[BaseModel] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def schema_fields(model: type[BaseModel] = Params, prefix: str = "") -> dict[str, FieldInfo]:
    """Every dotted key of the schema (sections too), in the schema's order."""
    out: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        out[prefix + name] = field
        section = _section(field)
        if section is not None:
            out.update(schema_fields(section, f"{prefix}{name}."))
    return out


def key_tasks(field: FieldInfo) -> list[str]:
    """The tasks that read a key (its json_schema_extra `tasks`); every task when unmarked."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return list(extra.get("tasks") or TASKS)


def task_mark(field: FieldInfo) -> str:
    """'sft only', 'seq_cls, causal_lm only', or '' for a key every task reads."""
    tasks = key_tasks(field)
    return "" if set(tasks) == set(TASKS) else ", ".join(tasks) + " only"


class _OneLineDumper(yaml.SafeDumper):
    """Text holding a line break or tab is double-quoted with escapes ("\\n"): one line."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if any(c in value for c in "\n\r\t") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_OneLineDumper.add_representer(str, _text)


def yaml_value(value: Any) -> str:
    """A value as one line of YAML (flow style for lists and mappings)."""
    text = yaml.dump(
        value,
        Dumper=_OneLineDumper,
        default_flow_style=True,
        width=float("inf"),
        allow_unicode=True,
        sort_keys=False,
    )
    return text.removesuffix("\n...\n").strip()


def _key_lines(name: str, field: FieldInfo, value: Any, indent: str) -> tuple[str, str, str]:
    """(description comment, `key: value`, mark) of one key."""
    return (
        f"{indent}# {field.description}",
        f"{indent}{name}: {yaml_value(value)}",
        task_mark(field),
    )


def _block(rows: list[tuple[str, str, str]]) -> list[str]:
    """The rows' lines, marks aligned one column past the longest marked `key: value`."""
    width = max((len(line) for _, line, mark in rows if mark), default=0) + 2
    return [
        text
        for comment, line, mark in rows
        for text in (comment, f"{line:<{width}}# {mark}" if mark else line)
    ]


def render(params: Params, header: str = "") -> str:
    """The complete params file of `params`: every key in the schema's order, each section
    under a heading; it loads back to `params` exactly."""
    dumped = params.model_dump()
    lines = header.splitlines()
    for name, field in Params.model_fields.items():
        section = _section(field)
        lines.append("")
        if section is None:
            lines += _block([_key_lines(name, field, dumped[name], "")])
            continue
        lines += [f"# --- {name} --- {field.description}", f"{name}:"]
        rows = [
            _key_lines(key, sub, dumped[name][key], "  ")
            for key, sub in section.model_fields.items()
        ]
        lines += _block(rows)
    return "\n".join(lines).lstrip("\n") + "\n"


_BOUNDS = ((at.Gt, "gt", ">"), (at.Ge, "ge", ">="), (at.Lt, "lt", "<"), (at.Le, "le", "<="))
_NAMES = {int: "an integer", float: "a number", str: "text"}


def _bounds(metadata: list[Any]) -> list[str]:
    out = []
    for item in metadata:
        if isinstance(item, FieldInfo):  # Annotated[int, Field(gt=0)]
            out += _bounds(item.metadata)
        out += [f"{sign} {getattr(item, a)}" for kind, a, sign in _BOUNDS if isinstance(item, kind)]
    return out


def _alternatives(ann: Any, metadata: list[Any]) -> tuple[list[str], list[str]]:
    """(literal choices, other forms) a value of type `ann` may take."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return _alternatives(args[0], [*metadata, *args[1:]])
    if origin in (Union, types.UnionType):
        choices: list[str] = []
        forms: list[str] = []
        for arg in args:
            more_choices, more_forms = _alternatives(arg, metadata)
            choices += more_choices
            forms += more_forms
        return choices, forms
    if origin is Literal:
        return [yaml_value(v) for v in args], []
    if ann is type(None):
        return ["null"], []
    if ann is bool:
        return ["true", "false"], []
    if ann in _NAMES:
        bounds = _bounds(metadata)
        first = f"{_NAMES[ann]} {bounds[0]}" if bounds else _NAMES[ann]
        return [], [" and ".join([first, *bounds[1:]])]
    if origin in (list, dict):
        item = allowed_text(args[-1])
        size = [f"at least {m.min_length}" for m in metadata if isinstance(m, at.MinLen)]
        kind = "a list of" if origin is list else "a mapping of text to"
        return [], [f"{kind} {item}" + (f" ({size[0]})" if size else "")]
    return [], [getattr(ann, "__name__", str(ann))]


def allowed_text(ann: Any, metadata: list[Any] | None = None) -> str:
    """The values a type allows, in words: 'one of a, b', 'auto or an integer > 0'."""
    choices, forms = _alternatives(ann, metadata or [])
    null = ["null"] if "null" in choices else []
    choices = [c for c in choices if c != "null"]
    head = [f"one of {', '.join(choices)}" if len(choices) > 2 else " or ".join(choices)]
    return " or ".join([h for h in head if h] + forms + null)


def stages_reading(key: str, dvc_yaml: Path, params_name: str = "params.yaml") -> list[str]:
    """The dvc.yaml stages whose `params` list the key, its section, or a key inside it."""
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
    found = []
    for name, stage in stages.items():
        listed: list[str] = []
        for entry in stage.get("params") or []:
            if isinstance(entry, str):
                listed.append(entry)
            elif isinstance(entry, dict) and params_name in entry:
                listed += entry[params_name] or [key]  # a bare file: all of its keys
        if any(p == key or key.startswith(p + ".") or p.startswith(key + ".") for p in listed):
            found.append(name)
    return found


def _value_at(params: Params, key: str) -> Any:
    value: Any = params.model_dump()
    for part in key.split("."):
        value = value[part]
    return value


def explain(key: str, params_path: Path = Path("params.yaml")) -> str:
    """A key's description, default, value in params_path, allowed values, tasks and stages
    (from the dvc.yaml beside params_path); an unknown key raises with the closest known one."""
    fields = schema_fields()
    if key not in fields:
        meant = _suggest(key)
        raise UserError(f"{key}: unknown key" + (f" (did you mean '{meant}'?)" if meant else ""))
    field = fields[key]
    lines = [f"{key}: {field.description}"]
    section = _section(field)
    if section is not None:
        lines.append(f"  keys:     {', '.join(section.model_fields)}")
    else:
        default = (
            "none: required (a recipe sets it)"
            if field.is_required()
            else yaml_value(field.get_default(call_default_factory=True))
        )
        try:
            value = f"{yaml_value(_value_at(load_params(params_path), key))} ({params_path})"
        except UserError as exc:
            value = f"unknown: {str(exc).splitlines()[0]}"
        lines += [
            f"  default:  {default}",
            f"  value:    {value}",
            f"  allowed:  {allowed_text(field.annotation, list(field.metadata))}",
            f"  tasks:    {task_mark(field) or 'every task'}",
        ]
    dvc_yaml = params_path.parent / "dvc.yaml"
    if dvc_yaml.is_file():
        stages = stages_reading(key, dvc_yaml, params_path.name)
        lines.append(f"  stages:   {', '.join(stages) or 'none'} ({dvc_yaml})")
    return "\n".join(lines)
