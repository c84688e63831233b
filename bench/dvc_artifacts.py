"""What DVC adds on a multi-GB model: hashing, caching, status, a no-op repro, restoring.

    python bench/dvc_artifacts.py              # a ~2 GB bf16 Qwen2.5-3B-shaped slice (9 blocks)
    python bench/dvc_artifacts.py --layers 1   # ~0.77 GB, quicker
    python bench/dvc_artifacts.py --help

A throwaway DVC project (in --dir, default the system temp folder; keep it on the filesystem
whose behaviour you want to know: hardlinks need the cache on the same one) with this
project's .dvc/config and one stage that writes a random model built from a config with
save_pretrained, as the merge stage writes models/merged. Measured, each with the `dvc`
command's own start-up (~1 s) included:

- repro: the first `dvc repro` (the stage, then DVC hashes the output and moves it into the
  cache, linking it back); the stage's own seconds are subtracted to give DVC's share
- status / no-op repro with the output present (DVC's state database knows its hash)
- rehash: `dvc status` after `touch` (same bytes, new mtime: DVC must read it all again),
  beside a plain hashlib.md5 of the same bytes
- checkout: the output deleted, restored from the cache by the configured link type, and
  again with cache.type copy for comparison
- push / pull: to a local-directory remote, and into a second clone (skip with --no-remote)

Writes reports/dvc_artifacts.json (or --out) and prints a table. The page cache is warm (the
file was just written), so reads come from memory: a cold disk would make hashing slower.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Qwen2.5-3B's shape (hidden 2048, GQA 16/2 heads, MLP 11008, vocab 151,936, tied embeddings)
# with fewer blocks: 622 MB of embeddings + 154 MB per block in bf16; 9 blocks ≈ 2.0 GB.
QWEN_SLICE = {
    "model_type": "qwen2",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}

BUILD = '''"""The bench stage: a random model from config.json, saved as the merge stage saves."""
import json, time
import psutil, torch
from transformers import AutoConfig, AutoModelForCausalLM

config = AutoConfig.for_model(**json.load(open("config.json")))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained("models/big")
seconds = time.time() - psutil.Process().create_time()
open("stage_seconds.txt", "w").write(f"{seconds:.2f}")
'''

DVC_YAML = """stages:
  build:
    cmd: python build.py
    deps: [build.py, config.json]
    outs: [models/big]
"""


def sh(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout}\n{proc.stderr}")
    return round(seconds, 2), proc.stdout


def dvc(*args: str, cwd: Path) -> tuple[float, str]:
    return sh([sys.executable, "-m", "dvc", *args], cwd)


def git(*args: str, cwd: Path) -> None:
    sh(["git", "-c", "user.email=b@b", "-c", "user.name=bench", *args], cwd)


def weights(project: Path) -> list[Path]:
    return sorted((project / "models/big").glob("*.safetensors"))


def md5_seconds(files: list[Path]) -> float:
    start = time.perf_counter()
    for file in files:
        with file.open("rb") as f:
            hashlib.file_digest(f, "md5")
    return round(time.perf_counter() - start, 2)


def linked(project: Path, file: Path) -> str:
    """How the workspace file relates to the cache: symlink, hardlink (shared inode), copy."""
    if file.is_symlink():
        return "symlink"
    return "hardlink" if file.stat().st_nlink > 1 else "copy (or reflink)"


def make_project(path: Path, config: dict[str, Any], cache_type: str | None) -> None:
    path.mkdir(parents=True)
    (path / "build.py").write_text(BUILD)
    (path / "config.json").write_text(json.dumps(config))
    (path / "dvc.yaml").write_text(DVC_YAML)
    sh(["git", "init", "-q"], path)
    dvc("init", "-q", cwd=path)
    shutil.copy2(ROOT / ".dvc/config", path / ".dvc/config")  # the project's link types
    if cache_type:
        dvc("config", "cache.type", cache_type, cwd=path)
    git("add", "-A", cwd=path)
    git("commit", "-qm", "bench project", cwd=path)


def measure(
    layers: int,
    workdir: Path,
    remote: bool = True,
    cache_type: str | None = None,
    shrink: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`shrink`: config keys over the Qwen slice's (the test makes a small model this way)."""
    project = workdir / "a"
    make_project(project, {**QWEN_SLICE, "num_hidden_layers": layers, **(shrink or {})}, cache_type)
    _, config = dvc("config", "cache.type", cwd=project)
    r: dict[str, Any] = {
        "layers": layers,
        "dir": str(workdir),
        "cache_type": config.strip().strip("[]").replace("'", ""),
    }
    r["repro_s"], _ = dvc("repro", cwd=project)
    r["stage_s"] = float((project / "stage_seconds.txt").read_text())
    r["dvc_share_of_repro_s"] = round(r["repro_s"] - r["stage_s"], 2)
    files = weights(project)
    r["bytes"] = sum(f.stat().st_size for f in files)
    r["files"] = len(files)
    r["link"] = linked(project, files[0])
    r["status_s"], _ = dvc("status", cwd=project)
    r["noop_repro_s"], out = dvc("repro", cwd=project)
    assert "Running stage" not in out, out
    for f in files:
        os.utime(f)  # same bytes, new mtime: DVC's state no longer vouches for the hash
    r["rehash_status_s"], _ = dvc("status", cwd=project)
    r["md5_python_s"] = md5_seconds(files)
    shutil.rmtree(project / "models/big")
    r["checkout_s"], _ = dvc("checkout", cwd=project)
    r["checkout_link"] = linked(project, weights(project)[0])
    dvc("config", "--local", "cache.type", "copy", cwd=project)
    shutil.rmtree(project / "models/big")
    r["checkout_copy_s"], _ = dvc("checkout", cwd=project)
    dvc("config", "--local", "--unset", "cache.type", cwd=project)
    if remote:
        store = workdir / "remote"
        dvc("remote", "add", "-d", "store", str(store), cwd=project)
        git("add", "-A", cwd=project)
        git("commit", "-qm", "lock + remote", cwd=project)
        r["push_s"], _ = dvc("push", "--run-cache", cwd=project)
        sh(["git", "clone", "-q", str(project), str(workdir / "b")], workdir)
        r["pull_s"], _ = dvc("pull", "--run-cache", cwd=workdir / "b")
        r["pull_noop_repro_s"], out = dvc("repro", cwd=workdir / "b")
        assert "Running stage" not in out, out
    return r


def table(r: dict[str, Any]) -> str:
    gb = r["bytes"] / 1e9
    rows = [
        ("output", f"{gb:.2f} GB in {r['files']} safetensors file(s), {r['layers']} blocks"),
        ("cache.type", r["cache_type"]),
        ("first dvc repro", f"{r['repro_s']} s (stage {r['stage_s']} s, DVC {r['dvc_share_of_repro_s']} s)"),  # noqa: E501
        ("after the first repro, output vs cache", r["link"]),
        ("dvc status", f"{r['status_s']} s"),
        ("no-op dvc repro", f"{r['noop_repro_s']} s (target <= 3 s)"),
        ("dvc status after touch (rehash)", f"{r['rehash_status_s']} s (hashlib md5 {r['md5_python_s']} s)"),  # noqa: E501
        ("restore: rm + dvc checkout", f"{r['checkout_s']} s ({r['checkout_link']})"),
        ("restore with cache.type copy", f"{r['checkout_copy_s']} s"),
    ]  # fmt: skip
    if "push_s" in r:
        rows += [
            ("dvc push --run-cache (local remote)", f"{r['push_s']} s"),
            ("dvc pull --run-cache (second clone)", f"{r['pull_s']} s"),
            ("no-op dvc repro in the clone", f"{r['pull_noop_repro_s']} s"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=9, help="transformer blocks (9: ~2.0 GB)")
    ap.add_argument("--dir", type=Path, default=None, help="where the throwaway project goes")
    ap.add_argument("--no-remote", action="store_true", help="skip push/pull")
    ap.add_argument("--cache-type", help="instead of .dvc/config's, e.g. reflink,copy")
    ap.add_argument("--keep", action="store_true", help="keep the throwaway project")
    ap.add_argument("--out", type=Path, default=ROOT / "reports/dvc_artifacts.json")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="dvc-artifacts-", dir=args.dir))
    load_before = round(os.getloadavg()[0], 2)  # 1-minute load: other work on the machine
    try:
        result = measure(args.layers, workdir, not args.no_remote, args.cache_type)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    result["load_avg_1min"] = {"before": load_before, "after": round(os.getloadavg()[0], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(table(result))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
