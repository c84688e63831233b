"""`make gpu-check`: the offline SmolLM2 recipe through `dvc repro` on this machine's GPU.

Two temporary copies of the project, the recipe offline-python-smollm2-qlora applied to each,
one as bf16 LoRA (quant.bits: none), one as 4-bit QLoRA (quant.bits: 4); each is reproduced
with `dvc repro` (the stages resolve the runtime for the GPU themselves), then tokens/s, MFU
(4·N·tokens/s over the GPU's dense bf16 peak: a frozen base), peak memory per device and eval
perplexity are printed next to the CPU run's figures from the README. Without CUDA it refuses
in one line (exit 2) and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's lorapipe, as the stages will use

from lorapipe.recipes import recipe_params  # noqa: E402
from lorapipe.runtime import detect  # noqa: E402

RECIPE = "offline-python-smollm2-qlora"
VARIANTS = {"bf16 LoRA": "none", "4-bit QLoRA": 4}  # name -> quant.bits
PROJECT_FILES = ["dvc.yaml", "stages", "configs", "data/raw", ".dvc/config", ".dvcignore"]
# The README's CPU run of this recipe (4-bit, fp32 compute, 2 shared cores): 25,344 tokens.
CPU = {"train_seconds": 548, "tokens_per_second": round(25344 / 548, 1), "perplexity": 33.63}
CPU_BASE_PERPLEXITY = 55.30


def project_copy(dest: Path, bits: str | int) -> Path:
    """The project's pipeline files, params = the recipe with quant.bits set, git + dvc."""
    for name in PROJECT_FILES:
        src, target = ROOT / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target)
        else:
            shutil.copy2(src, target)
    params = recipe_params(RECIPE).model_dump()
    params["quant"]["bits"] = bits
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=gpu-check@local", "-c", "user.name=gpu-check"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "gpu-check copy"], cwd=dest, check=True)
    return dest


def repro(project: Path, log: Path) -> dict[str, Any]:
    """`dvc repro` in the copy; its figures from reports/train/timing.json and eval.json."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT / "src"),
    }
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, stdout=out, stderr=out
        )
    if proc.returncode != 0:
        return {"error": f"dvc repro failed ({proc.returncode}); log: {log}"}
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
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu-check.json")
    args = parser.parse_args()
    machine = detect()
    if machine.accelerator != "cuda":
        print("gpu-check: no CUDA device on this machine; nothing was run", file=sys.stderr)
        return 2
    results = {}
    with tempfile.TemporaryDirectory(prefix="lorapipe-gpu-check-") as tmp:
        for name, bits in VARIANTS.items():
            print(f"{name}: dvc repro ...", flush=True)
            project = project_copy(Path(tmp) / str(bits), bits)
            log = args.out.parent / f"gpu-check-{bits}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            results[name] = repro(project, log)
    args.out.write_text(json.dumps({"machine": machine.name, **results}, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {args.out}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
