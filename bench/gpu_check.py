"""`make gpu-check`: the offline SmolLM2 recipe through `dvc repro` on this machine's GPU.

Two temporary copies of the project, the recipe offline-python-smollm2-qlora applied to each,
one as bf16 LoRA (quant.bits: none), one as 4-bit QLoRA (quant.bits: 4); each is reproduced
with `dvc repro` (every stage: the stages resolve the runtime for the device themselves), then
tokens/s, MFU (4·N·tokens/s over the GPU's dense bf16 peak: a frozen base), peak memory per
device and eval perplexity are printed next to the CPU run's figures from the README.

A copy holds every path a stage of dvc.yaml depends on that no stage writes (read from
dvc.yaml, so it follows the stages' deps), with DVC's own files and the recipe's params.yaml.

Without CUDA it refuses in one line (exit 2) and runs nothing. `--device cpu` (`make gpu-check
DEVICE=cpu`) runs the same copies through the same `dvc repro` with the GPU hidden from the
stages and the recipe shrunk to a few steps on a few rows: the entry point end to end in a
couple of minutes, whose figures are a smoke test, not the README's CPU measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's lorapipe, as the stages will use

from lorapipe.config import Params, parse_params  # noqa: E402
from lorapipe.recipes import recipe_params  # noqa: E402
from lorapipe.runtime import detect  # noqa: E402

RECIPE = "offline-python-smollm2-qlora"
VARIANTS = {"bf16 LoRA": "none", "4-bit QLoRA": 4}  # name -> quant.bits
DVC_FILES = ["dvc.yaml", ".dvc/config", ".dvcignore"]
# --device cpu: the recipe shrunk to a few steps on a few short rows (dotted params keys).
CPU_SMOKE = {
    "data.max_train_rows": 24,
    "data.max_eval_rows": 8,
    "tokenize.max_length": 128,
    "train.batch_size": 2,
    "train.max_steps": 3,
    "train.logging_steps": 1,
    "evaluate.batch_size": 2,
    "evaluate.num_samples": 1,
    "evaluate.max_new_tokens": 8,
}
# The README's CPU run of this recipe (4-bit, fp32 compute, 2 shared cores): 25,344 tokens.
CPU = {"train_seconds": 548, "tokens_per_second": round(25344 / 548, 1), "perplexity": 33.63}
CPU_BASE_PERPLEXITY = 55.30


def pipeline_files(dvc_yaml: Path = ROOT / "dvc.yaml") -> list[str]:
    """DVC's files and every stage dep that no stage writes (the rest `dvc repro` makes)."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    written = set()
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            written |= {e if isinstance(e, str) else next(iter(e)) for e in stage.get(key, [])}
    deps = {d for stage in stages.values() for d in stage.get("deps", [])}
    inputs = {d for d in deps if not any(d == w or d.startswith(w + "/") for w in written)}
    return [*DVC_FILES, *sorted(inputs)]


def copy_params(bits: str | int, device: str) -> Params:
    """The recipe with quant.bits set; shrunk by CPU_SMOKE for --device cpu."""
    params = recipe_params(RECIPE).model_dump()
    params["quant"]["bits"] = bits
    for key, value in (CPU_SMOKE if device == "cpu" else {}).items():
        section, name = key.split(".")
        params[section][name] = value
    return parse_params(params, f"recipe {RECIPE} (gpu-check)")


def project_copy(dest: Path, bits: str | int, device: str = "cuda") -> Path:
    """The project's pipeline files, params = the recipe with quant.bits set, git + dvc."""
    for name in pipeline_files():
        src, target = ROOT / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    params = copy_params(bits, device).model_dump()
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    git = ["git", "-c", "user.email=gpu-check@local", "-c", "user.name=gpu-check"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "gpu-check copy"], cwd=dest, check=True)
    return dest


def child_env(project: Path, device: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of `dvc repro` in a copy: this venv first on PATH, the copy's own
    lorapipe (the code DVC hashed), and the GPUs the stages may see.

    cpu: none (torch then reports no CUDA, and every stage resolves for the CPU). cuda, when
    CUDA_VISIBLE_DEVICES is not set: as many as the copy's train.num_processes asks (auto: one).
    A single process that sees several GPUs would train under nn.DataParallel over all of them
    (Trainer's n_gpu), and the per-device figures would be wrong."""
    env = {
        **environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}",
        "PYTHONPATH": str(project / "src"),
    }
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif "CUDA_VISIBLE_DEVICES" not in environ:
        params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
        asked = params["train"]["num_processes"]
        count = 1 if asked == "auto" else asked
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(count))
    return env


def repro(project: Path, log: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """`dvc repro` in the copy; its figures from reports/train/timing.json and eval.json."""
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, stdout=out, stderr=out
        )
    if proc.returncode != 0:
        last = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"dvc repro failed ({proc.returncode}): {last} (log: {log})"}
    timing = json.loads((project / "reports/train/timing.json").read_text())
    evaluation = json.loads((project / "reports/eval.json").read_text())
    return {
        **timing,
        "perplexity": round(evaluation["perplexity"], 2),
        "base_perplexity": round(evaluation["base"]["perplexity"], 2),
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    names = ["CPU (README)", *results]
    cols = [CPU | {"base_perplexity": CPU_BASE_PERPLEXITY}, *results.values()]
    lines = [f"{'':<28}" + "".join(f"{n:>18}" for n in names)]
    for key, label in (
        ("tokens_per_second", "train tokens/s"),
        ("train_seconds", "train seconds"),
        ("mfu", "MFU (4N, frozen base)"),
        ("peak_memory_gb_per_device", "peak memory GB/device"),
        ("base_perplexity", "eval perplexity, base"),
        ("perplexity", "eval perplexity, tuned"),
        ("device", "device"),
    ):
        lines.append(f"{label:<28}" + "".join(f"{c.get(key, '-')!s:>18}" for c in cols))
    lines += [f"{n}: {c['error']}" for n, c in results.items() if "error" in c]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="reports/gpu-check.json (cpu: gpu-check-cpu)")
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: the same copies and dvc repro on the CPU, shrunk to a few steps",
    )
    args = parser.parse_args()
    suffix = "-cpu" if args.device == "cpu" else ""
    out = args.out or ROOT / "reports" / f"gpu-check{suffix}.json"
    machine = detect()
    if args.device == "cuda" and machine.accelerator != "cuda":
        print("gpu-check: no CUDA device on this machine; nothing was run", file=sys.stderr)
        return 2
    results = {}
    with tempfile.TemporaryDirectory(prefix="lorapipe-gpu-check-") as tmp:
        for name, bits in VARIANTS.items():
            print(f"{name}: dvc repro ...", flush=True)
            project = project_copy(Path(tmp) / str(bits), bits, args.device)
            log = out.parent / f"{out.stem}-{bits}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            results[name] = repro(project, log, child_env(project, args.device, os.environ))
    machine_name = "cpu" if args.device == "cpu" else machine.name
    out.write_text(json.dumps({"machine": machine_name, **results}, indent=2) + "\n")
    print(table(results))
    if args.device == "cpu":
        shrunk = ", ".join(f"{k} {v}" for k, v in CPU_SMOKE.items())
        print(f"\n(--device cpu: {shrunk}; a smoke run of the entry point, not a measurement)")
    print(f"\nwrote {out}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
