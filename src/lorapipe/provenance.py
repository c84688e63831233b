"""Every artifact certifies what made it, and `lorapipe verify` checks one against a checkout.

A certificate (certificate.json in the folder, summarised in its README.md) records the git
commit and whether the tree was dirty, the md5 of each of the stage's inputs as dvc.lock records
it (computed with DVC's own hashing, for the deps and params dvc.yaml lists), the library
versions, the machine, the runtime's choices, the artifact's metrics and the md5 of each file in
the folder. The stage is the one whose outs in ./dvc.yaml hold the folder; a folder written
elsewhere (a library call, a benchmark) records no inputs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml

from lorapipe.card import provenance_section
from lorapipe.config import UserError
from lorapipe.io import read_json, write_json
from lorapipe.runtime import Machine, Runtime, detect

CERTIFICATE = "certificate.json"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "dvc")
# The x86 extensions that pick different torch / oneDNN / bitsandbytes kernels.
KERNEL_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip
# What makes two machines compute differently, per accelerator.
MACHINE_KEYS = {
    "cpu": ("accelerator", "cpu", "cpu_flags"),
    "cuda": ("accelerator", "gpu", "count", "capability"),
}
UNKNOWN = "unknown"
REQUIRED = {"stage", "git", "inputs", "versions", "machine", "files"}


def md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """Each file's md5 by its path in the folder, the certificate left out."""
    files = (f for f in sorted(folder.rglob("*")) if f.is_file())
    return {f.relative_to(folder).as_posix(): md5(f) for f in files if f.name != CERTIFICATE}


def _stages(root: Path) -> dict[str, Any]:
    path = root / "dvc.yaml"
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {})


def _outputs(stage: dict[str, Any]) -> list[str]:
    """A stage's outs, metrics and plots (each a path or a {path: options} entry)."""
    entries = [e for key in ("outs", "metrics", "plots") for e in stage.get(key, [])]
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def stage_of(out: Path, root: Path) -> str | None:
    """The dvc.yaml stage that writes `out`, or None."""
    target = out.resolve()
    for name, stage in _stages(root).items():
        if any((root / o).resolve() == target for o in _outputs(stage)):
            return name
    return None


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def git_state(root: Path) -> dict[str, Any]:
    """HEAD and whether tracked inputs differ from it (what DVC writes, dvc.lock and the stages'
    outputs, left out). Inside `dvc exp run --temp`/`--queue` this is the experiment's copy, its
    HEAD the baseline commit and the experiment's changes uncommitted."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        except OSError:  # no git on this machine
            return None
        return proc.stdout if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "-z", "--untracked-files=no", "--", ".")
    prefix = git("rev-parse", "--show-prefix")
    state: dict[str, Any] = {"commit": commit.strip() if commit else UNKNOWN, "dirty": UNKNOWN}
    if status is not None and prefix is not None:
        generated = ["dvc.lock", *(o for s in _stages(root).values() for o in _outputs(s))]
        entries, paths = iter(status.split("\0")), []
        for entry in entries:
            if entry:
                paths.append(entry[3:].removeprefix(prefix.strip()))
                if "R" in entry[:2] or "C" in entry[:2]:
                    next(entries)  # a rename's or copy's source path
        changed = [p for p in paths if not any(_under(p, g) for g in generated)]
        state |= {"dirty": bool(changed), "changed": changed[:20]}
    if "DVC_EXP_NAME" in os.environ:
        state["experiment"] = {
            "name": os.environ["DVC_EXP_NAME"],
            "baseline": os.environ.get("DVC_EXP_BASELINE_REV", UNKNOWN),
        }
    return state


def stage_inputs(name: str, root: Path) -> dict[str, Any]:
    """{"deps": {path: md5}, "params": {file: {key: value}}} of a dvc.yaml stage, as `dvc repro`
    would write them into dvc.lock now (None for a dep that is absent)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    deps: dict[str, str | None] = {}
    params: dict[str, dict[str, Any]] = {}
    with Repo(str(root)) as repo:
        stage = repo.stage.load_one(path="dvc.yaml", name=name)
        for dep in stage.deps:
            if isinstance(dep, ParamsDependency):
                params[dep.def_path] = dict(sorted(dep.read_params().items()))
            elif not dep.exists:
                deps[dep.def_path] = None
            else:
                dep.update_legacy_hash_name()  # as Output.save: md5, unless a 2.x lock still holds
                deps[dep.def_path] = dep.get_hash().value
    return {"deps": deps, "params": params}


def versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _cpu() -> tuple[str, list[str]]:
    """The CPU's model name and which of KERNEL_FLAGS it has."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return platform.processor() or platform.machine() or UNKNOWN, []
    fields: dict[str, str] = {}
    for line in info.splitlines():  # the first processor's value of each field
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", platform.machine() or UNKNOWN), [
        f for f in KERNEL_FLAGS if f in flags
    ]


def machine(m: Machine) -> dict[str, Any]:
    cpu, flags = _cpu()
    out: dict[str, Any] = {
        "accelerator": m.accelerator,
        "name": m.name,
        "count": m.count,
        "memory_gb": round(m.memory_gb, 1),
        "bf16": m.bf16,
        "cpu": cpu,
        "cpu_flags": flags,
    }
    if m.accelerator == "cuda":
        out["gpu"], out["capability"] = m.gpu, f"{m.capability:.1f}"
    return out


def collect(
    out: Path, rt: Runtime, metrics: dict[str, Any], root: Path = Path(".")
) -> dict[str, Any]:
    """The certificate of the artifact about to be written at `out` (its files not yet listed)."""
    stage = stage_of(out, root)
    return {
        "artifact": out.as_posix(),
        "stage": stage,
        "git": git_state(root),
        "inputs": stage_inputs(stage, root) if stage else None,
        "versions": versions(),
        "machine": machine(rt.machine),
        "runtime": rt.summary(),
        "metrics": metrics,
    }


def certify(folder: Path, out: Path, rt: Runtime, metrics: dict[str, Any] | Path) -> dict[str, Any]:
    """Write the certificate into `folder` (the temporary folder that becomes `out`): the
    Provenance section of its README.md, then certificate.json with every file's md5."""
    cert = collect(out, rt, read_json(metrics) if isinstance(metrics, Path) else metrics)
    readme = folder / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else f"# {out.name}\n"
    readme.write_text(text.rstrip("\n") + "\n\n" + provenance_section(cert), encoding="utf-8")
    cert["files"] = file_hashes(folder)
    write_json(folder / CERTIFICATE, cert)
    return cert


def _load(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise UserError(f"verify: {folder} is not a folder")
    try:
        cert = read_json(folder / CERTIFICATE)
    except FileNotFoundError:
        raise UserError(
            f"verify: {folder} has no {CERTIFICATE}: not a certified artifact"
        ) from None
    except ValueError:
        cert = None
    sound = isinstance(cert, dict) and cert.keys() >= REQUIRED
    if not sound or not isinstance(cert["files"], dict):
        raise UserError(f"verify: {folder / CERTIFICATE} is not a readable certificate")
    return cert


def _corrupt(folder: Path, files: dict[str, str]) -> list[str]:
    here = file_hashes(folder)
    missing = [f"{f} missing" for f in files if f not in here]
    changed = [f"{f} changed" for f in files if f in here and here[f] != files[f]]
    # Hidden files are what copies add (.gitattributes from the hub, download caches).
    extra = [f"{f} not certified" for f in here if f not in files and not f.startswith(".")]
    return missing + changed + extra


def _is_code(path: str) -> bool:
    return path.endswith(".py") or path.split("/")[0] in ("src", "stages", "configs")


def _dotted(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A section dvc.yaml lists whole ({"lora": {"r": 8}}) as its keys ({"lora.r": 8})."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            out |= _dotted(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _compare(cert: dict[str, Any], root: Path) -> dict[str, list[str]]:
    """What differs between the certificate and the checkout, by kind of input."""
    diff: dict[str, list[str]] = {k: [] for k in ("code", "data", "params", "versions", "machine")}
    was, now = cert["inputs"], stage_inputs(cert["stage"], root)
    for path in sorted(set(was["deps"]) | set(now["deps"])):
        kind = diff["code" if _is_code(path) else "data"]
        if path not in now["deps"]:
            kind.append(f"{path} no longer a dep")
        elif path not in was["deps"]:
            kind.append(f"{path} a dep now, not certified")
        elif now["deps"][path] is None:
            kind.append(f"{path} absent here")
        elif now["deps"][path] != was["deps"][path]:
            kind.append(path)
    for file in sorted(set(was["params"]) | set(now["params"])):
        old, new = _dotted(was["params"].get(file, {})), _dotted(now["params"].get(file, {}))
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new or old[key] != new[key]:
                was_value, now_value = old.get(key, "unset"), new.get(key, "unset")
                diff["params"].append(f"{key} ({was_value!r} certified, {now_value!r} here)")
    here = versions()
    for lib, version in cert["versions"].items():
        if here.get(lib) != version:
            diff["versions"].append(f"{lib} {version} → {here.get(lib, 'absent')}")
    m, then = machine(detect()), cert["machine"]
    for key in MACHINE_KEYS.get(then.get("accelerator"), ()):
        if m.get(key) != then.get(key):
            diff["machine"].append(f"{key} {then.get(key)} → {m.get(key)}")
    return diff


def verify(folder: Path, root: Path = Path(".")) -> tuple[int, list[str]]:
    """(exit code, report lines): 0 all matches, 1 inputs differ from the checkout at `root`,
    2 the folder is corrupt. A missing or unreadable certificate raises UserError (exit 2)."""
    if not (root / "dvc.yaml").is_file():
        raise UserError(f"verify: no dvc.yaml in {root.resolve()}; run it in the project checkout")
    cert = _load(folder)
    git = cert["git"]
    dirty = " (dirty)" if git.get("dirty") is True else ""
    lines = [f"{folder}: stage {cert['stage']}, commit {git.get('commit', UNKNOWN)}{dirty}"]
    corrupt = _corrupt(folder, cert["files"])
    if corrupt:
        return 2, [*lines, f"files: corrupt: {', '.join(corrupt)}"]
    lines.append(f"files: ok ({len(cert['files'])} files)")
    if not cert["stage"] or not cert["inputs"]:
        return 1, [*lines, "inputs: not recorded (written outside a dvc.yaml stage): cannot check"]
    if cert["stage"] not in _stages(root):
        return 1, [*lines, f"code: dvc.yaml here has no stage {cert['stage']}"]
    diff = _compare(cert, root)
    lines += [f"{k}: differs: {', '.join(v)}" if v else f"{k}: ok" for k, v in diff.items()]
    return (1 if any(diff.values()) else 0), lines
