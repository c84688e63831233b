"""User commands: check, plan, recipe, predict, generate, compare, push."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lorapipe.config import Params, UserError, load_params
from lorapipe.recipes import apply_recipe, list_recipes, recipe_params


def _params(args: argparse.Namespace) -> Params:
    return recipe_params(args.recipe) if getattr(args, "recipe", None) else load_params(args.params)


def cmd_check(args: argparse.Namespace) -> None:
    from lorapipe.modeling import preflight

    p = _params(args)
    preflight(p)
    print(f"ok: {args.recipe or args.params} is valid for {p.model.name} ({p.task})")


def cmd_plan(args: argparse.Namespace) -> None:
    from lorapipe import plan

    p = _params(args)
    try:
        config = plan.load_model_config(p.model.name)
    except ValueError as exc:
        raise UserError(f"model.name: {exc}") from None
    bits = None if p.quant.bits == "none" else int(p.quant.bits)
    counts = plan.count_trainable(
        config, p.task, p.lora.r, p.lora.alpha, list(p.lora.target_modules), p.data.num_labels
    )
    memory = {
        gc: plan.estimate_memory(
            config,
            counts,
            bits,
            p.train.batch_size,
            p.tokenize.max_length,
            gradient_checkpointing=gc,
            double_quant=p.quant.double_quant,
            # our loader keeps an unquantized base in fp32
            compute_dtype_bytes=4 if bits is None else 2,
        )
        for gc in (False, True)
    }
    print(plan.format_plan(p.model.name, counts, memory[False], memory[True], args.device_gb))


def cmd_recipe(args: argparse.Namespace) -> None:
    if args.action == "list":
        for name, summary in list_recipes().items():
            print(f"{name:32s} {summary}")
    elif args.action == "show":
        print(json.dumps(recipe_params(args.name).model_dump(), indent=2))
    else:
        apply_recipe(args.name, Path(args.params), force=args.force)
        print(f"params.yaml now holds recipe '{args.name}'; run `dvc repro` or `dvc exp run`")


def cmd_compare(args: argparse.Namespace) -> None:
    from lorapipe import compare

    repo = Path(".")
    rows = compare.experiments(repo)
    metrics = [args.metric, "eval:tuned.loss", "timing:train_seconds"]
    print(compare.table(rows, args.params_shown, metrics).to_string(index=False))
    compare.plot(repo, rows, args.params_shown[0], args.metric, Path(args.out))
    print(f"wrote {args.out}")


def cmd_push(args: argparse.Namespace) -> None:
    from lorapipe.hub import push

    print(json.dumps(push(load_params(args.params)), indent=2))


def _read_inputs(source: str) -> list[str]:
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _load(args: argparse.Namespace, p: Params) -> Any:
    import torch

    from lorapipe.modeling import load_tokenizer, load_with_adapter
    from lorapipe.tasks import get_task

    if args.model:  # a merged, standalone folder
        from transformers import AutoTokenizer

        model = get_task(p.task).auto_model.from_pretrained(args.model, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(args.model)
    return load_with_adapter(p, args.adapter), load_tokenizer(p)


def cmd_predict(args: argparse.Namespace) -> None:
    import torch

    p = load_params(args.params)
    if p.task != "seq_cls":
        raise UserError(f"task: predict is for seq_cls; this project is {p.task} (use generate)")
    model, tok = _load(args, p)
    for line in _read_inputs(args.input):
        enc = tok(line, truncation=True, max_length=p.tokenize.max_length, return_tensors="pt")
        with torch.no_grad():
            probs = model(**enc).logits.softmax(-1)[0]
        label = int(probs.argmax())
        print(
            json.dumps({"text": line, "label": label, "probability": round(float(probs[label]), 4)})
        )


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    p = load_params(args.params)
    if p.task == "seq_cls":
        raise UserError("task: generate is for causal_lm and sft; this project is seq_cls")
    model, tok = _load(args, p)
    from lorapipe.chat import prompt_text, require_template

    if p.task == "sft":
        require_template(tok, p.data)
    for line in _read_inputs(args.input):
        # sft: what training put before an answer (the chat template or the separator)
        prompt = prompt_text(tok, p.data, line) if p.task == "sft" else line
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        completion = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        print(json.dumps({"prompt": line, "generated": completion}))


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
        if name == "plan":
            cmd.add_argument("--device-gb", type=float, help="also compare with this device")
    add("push", cmd_push, "upload models/adapter or models/merged to the hub (params: hub)")
    rec = add("recipe", cmd_recipe, "list, show or apply the recipes in recipes/")
    rec.add_argument("action", choices=["list", "show", "apply"])
    rec.add_argument("name", nargs="?")
    rec.add_argument("--force", action="store_true", help="overwrite uncommitted params edits")
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
    cmp.add_argument("--out", default="reports/compare.png")
    for name, fn, text in (
        ("predict", cmd_predict, "label + probability per input line"),
        ("generate", cmd_generate, "greedy completion per input line"),
    ):
        cmd = add(name, fn, text)
        cmd.add_argument("input", nargs="?", default="-", help="a text file, or - for stdin")
        cmd.add_argument("--adapter", default="models/adapter", help="base + this adapter")
        cmd.add_argument("--model", help="a merged model folder instead of base + adapter")
        cmd.add_argument("--max-new-tokens", type=int, default=40)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "recipe" and args.action != "list" and not args.name:
        parser().error("recipe show/apply needs a recipe name")
    try:
        args.fn(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
