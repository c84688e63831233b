"""User commands: check, plan, recipe, params, predict, generate, compare, push, verify, search,
lm-eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lorapipe.config import Params, UserError, load_params
from lorapipe.recipes import apply_recipe, list_recipes, recipe_params
from lorapipe.stage import fail, quiet_libraries


def _params(args: argparse.Namespace) -> Params:
    return recipe_params(args.recipe) if getattr(args, "recipe", None) else load_params(args.params)


def cmd_check(args: argparse.Namespace) -> None:
    from lorapipe.data_sources import check_data

    p = _params(args)  # params, then the data files' headers: both before torch loads
    if args.params_only:
        print(f"ok: {args.recipe or args.params}")
        return
    data = check_data(p)
    from lorapipe.modeling import preflight

    preflight(p)
    print(f"ok: {args.recipe or args.params} is valid for {p.model.name} ({p.task})")
    for line in data:
        print(f"ok: {line}")


def cmd_plan(args: argparse.Namespace) -> None:
    from lorapipe import plan
    from lorapipe.lora import check_variant
    from lorapipe.runtime import describe, detect

    p = _params(args)
    check_variant(p)
    machine = describe(args.machine) if args.machine else detect()
    try:
        result = plan.machine_plan(p, machine)
    except ValueError as exc:
        raise UserError(f"model.name: {exc}") from None
    memory = result["train_memory_by_gc"]
    counts = result["counts"]
    print(plan.format_plan(p.model.name, counts, memory[False], memory[True], args.device_gb))
    print()
    print(plan.format_machine_plan(result))


def cmd_recipe(args: argparse.Namespace) -> None:
    if args.action == "list":
        for name, summary in list_recipes().items():
            print(f"{name:32s} {summary}")
    elif args.action == "show":
        print(json.dumps(recipe_params(args.name).model_dump(), indent=2))
    else:
        apply_recipe(args.name, Path(args.params), force=args.force)
        print(f"params.yaml now holds recipe '{args.name}'; run `dvc repro` or `dvc exp run`")


def cmd_params(args: argparse.Namespace) -> None:
    from lorapipe.params_file import explain

    print(explain(args.key, Path(args.params)))


def cmd_compare(args: argparse.Namespace) -> None:
    from lorapipe import compare

    repo = Path(".")
    rows = compare.experiments(repo)
    metrics = [args.metric, "eval:tuned.loss", "timing:train_seconds"]
    print(compare.table(rows, args.params_shown, metrics).to_string(index=False))
    band = compare.noise_band(rows, args.metric)
    if len(band):
        print(f"\n{args.metric} over seeds (configurations differing only in train.seed):")
        print(band.to_string(index=False))
    if args.out:  # opt-in: a tracked PNG rewritten by every call would dirty the tree
        compare.plot(repo, rows, args.params_shown[0], args.metric, Path(args.out))
        print(f"wrote {args.out}")


def cmd_push(args: argparse.Namespace) -> None:
    from lorapipe.hub import push

    print(json.dumps(push(load_params(args.params)), indent=2))


def cmd_search(args: argparse.Namespace) -> None:
    from lorapipe import search, searchrun

    repo = Path(".")
    spec = search.load_spec(Path(args.space), repo)  # every check before any trial
    if not args.report:
        print(f"study {spec.study}: {spec.trials} trials, {spec.objective} ({spec.direction})")
        print(f"storage {spec.storage}")
        searchrun.search(spec, repo, jobs=args.jobs, push=args.push)
    print("\n".join(searchrun.report(spec, Path(args.out))))


def cmd_verify(args: argparse.Namespace) -> None:
    from lorapipe.provenance import verify

    code, lines = verify(Path(args.folder))
    print("\n".join(lines))
    if code:  # 1: its inputs differ from this checkout; 2: the folder is corrupt
        sys.exit(code)


def _read_inputs(source: str) -> list[str]:
    from lorapipe.data_sources import read_text_file

    if source == "-":
        text = sys.stdin.read()
    elif Path(source).is_dir():
        raise UserError(f"input: {source} is a directory; name a text file (or - for stdin)")
    elif not Path(source).is_file():
        raise UserError(f"input: file not found: {source}")
    else:
        text = read_text_file(Path(source), "input")
    return [line for line in text.splitlines() if line.strip()]


# The head a command needs, as config.json's `architectures` names it (read without transformers).
HEADS = {
    "predict": "ForSequenceClassification",
    "generate": "ForCausalLM",
    "lm-eval": "ForCausalLM",
}


def _check_model_folders(args: argparse.Namespace) -> None:
    """Before any model loads (seconds to a minute): the folder to load exists, is one, and has
    the head the command needs (a classifier's would generate gibberish, and the reverse)."""
    if args.model:
        config = Path(args.model) / "config.json"
        if not config.is_file():
            what = "is not a model folder (no config.json)"
            raise UserError(
                f"--model: {args.model} {what if Path(args.model).is_dir() else 'does not exist'}; "
                "a merged model folder, such as models/merged after `dvc repro merge`"
            )
        head = HEADS[args.command]
        kinds = json.loads(config.read_text()).get("architectures") or []
        if not any(k.endswith(head) for k in kinds):
            raise UserError(
                f"--model: {args.model} is a {', '.join(kinds) or 'model of unknown kind'}; "
                f"{args.command} needs a *{head} model"
            )
    elif not (Path(args.adapter) / "adapter_config.json").is_file():
        raise UserError(
            f"--adapter: {args.adapter} holds no trained adapter (no adapter_config.json); "
            "train one first with `dvc repro train`, or pass --model models/merged"
        )


def _load(args: argparse.Namespace, p: Params) -> Any:
    from lorapipe.modeling import load_config, load_tokenizer, load_with_adapter
    from lorapipe.runtime import resolve
    from lorapipe.tasks import get_task

    rt = resolve(p, load_config(p))
    if args.model:  # a merged, standalone folder
        from transformers import AutoTokenizer

        model = get_task(p.task).auto_model.from_pretrained(
            args.model, dtype=rt.base_dtype, device_map=rt.device_map
        )
        return model.eval(), AutoTokenizer.from_pretrained(args.model)
    tok = load_tokenizer(p)
    return load_with_adapter(p, rt, args.adapter, tok.pad_token_id), tok


def cmd_predict(args: argparse.Namespace) -> None:
    p = load_params(args.params)
    if p.task != "seq_cls":  # by name: tasks.py loads torch, and this refusal comes before it
        raise UserError(f"task: predict is for seq_cls; this project is {p.task} (use generate)")
    _check_model_folders(args)
    lines = _read_inputs(args.input)
    import torch

    model, tok = _load(args, p)
    for line in lines:
        enc = tok(line, truncation=True, max_length=p.tokenize.max_length, return_tensors="pt")
        enc = enc.to(model.device)
        with torch.no_grad():
            probs = model(**enc).logits.softmax(-1)[0]
        label = int(probs.argmax())
        print(
            json.dumps({"text": line, "label": label, "probability": round(float(probs[label]), 4)})
        )


def cmd_generate(args: argparse.Namespace) -> None:
    p = load_params(args.params)
    if p.task == "seq_cls":  # by name: tasks.py loads torch, and this refusal comes before it
        raise UserError("task: generate is for causal_lm and sft; this project is seq_cls")
    _check_model_folders(args)
    lines = _read_inputs(args.input)
    import torch

    from lorapipe.tasks import get_task

    model, tok = _load(args, p)
    task = get_task(p.task)
    for line in lines:
        prompt = task.prompt(tok, p.data, line)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        completion = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        print(json.dumps({"prompt": line, "generated": completion}))


def cmd_lm_eval(args: argparse.Namespace) -> None:
    from lorapipe import lmeval

    lmeval.require_lm_eval()
    _check_model_folders(args)
    kw = {"include_path": args.include_path, "limit": args.limit, "batch_size": args.batch_size}
    print("\n".join(lmeval.summary(lmeval.run(args.model, args.tasks, args.out, **kw))))
    print(f"wrote {args.out}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lorapipe", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help)
        cmd.set_defaults(fn=fn)
        cmd.add_argument(
            "--params", default="params.yaml", help="params file (default params.yaml)"
        )
        return cmd

    for name, fn, text in (
        ("check", cmd_check, "validate params and the model's shape, no weights"),
        ("plan", cmd_plan, "trainable params and peak memory, from config"),
    ):
        cmd = add(name, fn, text)
        cmd.add_argument("--recipe", help="a recipe name instead of --params")
        if name == "check":
            cmd.add_argument(
                "--params-only",
                action="store_true",
                help="the params file alone, in a fraction of a second (`make repro` runs it "
                "before `dvc repro`, whose own reader reports a duplicate key in 12 lines)",
            )
        if name == "plan":
            cmd.add_argument("--device-gb", type=float, help="also compare with this device")
            cmd.add_argument(
                "--machine",
                help="plan for a described machine: cpu, t4, a10g, l4, a100-40, a100-80, h100, "
                "each optionally xN (h100x8); default: this machine",
            )
    add("push", cmd_push, "upload models/adapter or models/merged to the hub (params: hub)")
    rec = add("recipe", cmd_recipe, "list, show or apply the recipes in recipes/")
    rec.add_argument("action", choices=["list", "show", "apply"])
    rec.add_argument("name", nargs="?")
    rec.add_argument("--force", action="store_true", help="overwrite uncommitted params edits")
    prm = add("params", cmd_params, "explain a params key: meaning, default, value, stages")
    prm.add_argument("action", choices=["explain"])
    prm.add_argument("key", help="a dotted key, e.g. lora.r")
    cmp = sub.add_parser("compare", help="dvc exp show → a table and a PNG")
    cmp.set_defaults(fn=cmd_compare)
    cmp.add_argument(
        "--params",
        dest="params_shown",
        nargs="+",
        default=["lora.r", "lora.alpha"],
        help="params columns; the first is the PNG's x axis",
    )
    cmp.add_argument("--metric", default="eval:accuracy", help="<metrics file stem>:<key>")
    cmp.add_argument("--out", help="also draw the metric and loss curves into this PNG")
    sea = sub.add_parser("search", help="an Optuna study over params; each trial a DVC experiment")
    sea.set_defaults(fn=cmd_search)
    sea.add_argument("space", nargs="?", default="search.yaml", help="default search.yaml")
    sea.add_argument("-j", "--jobs", type=int, default=1, help="parallel trials on this machine")
    sea.add_argument("--push", metavar="REMOTE", help="dvc exp push each finished trial there")
    sea.add_argument("--report", action="store_true", help="the best trial and plots, no trials")
    sea.add_argument("--out", default="reports/search", help="plots folder (reports/search)")
    ver = sub.add_parser("verify", help="a model folder's certificate against this checkout")
    ver.set_defaults(fn=cmd_verify)
    ver.add_argument("folder", nargs="?", default="models/adapter", help="default models/adapter")
    for name, fn, text in (
        ("predict", cmd_predict, "label + probability per input line"),
        ("generate", cmd_generate, "greedy completion per input line"),
    ):
        cmd = add(name, fn, text)
        cmd.add_argument("input", nargs="?", default="-", help="a text file, or - for stdin")
        cmd.add_argument("--adapter", default="models/adapter", help="base + this adapter")
        cmd.add_argument("--model", help="a merged model folder instead of base + adapter")
        cmd.add_argument("--max-new-tokens", type=int, default=40)
    lme = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a merged causal model")
    lme.set_defaults(fn=cmd_lm_eval)
    lme.add_argument("--tasks", required=True, help="comma-separated: sst2_local, mmlu, ...")
    lme.add_argument("--model", default="models/merged", help="default models/merged")
    lme.add_argument("--include-path", help="a folder of task YAMLs (default configs/lm_eval)")
    lme.add_argument("--limit", type=int, help="at most N examples per task")
    lme.add_argument("--batch-size", type=int, default=8, help="default 8")
    lme.add_argument("--out", default="reports/lm_eval.json", help="default reports/lm_eval.json")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "recipe" and args.action != "list" and not args.name:
        parser().error("recipe show/apply needs a recipe name")
    quiet_libraries()
    try:
        args.fn(args)
    except UserError as exc:
        fail(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
