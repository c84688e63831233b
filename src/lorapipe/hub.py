"""Opt-in push of the adapter or merged model to the Hugging Face hub (`lorapipe push`).

Not a DVC stage: an upload is a side effect, not an artifact. The token comes from the
environment (HF_TOKEN) or huggingface-cli login and is never written anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorapipe.config import Params, UserError

FOLDERS = {"adapter": Path("models/adapter"), "merged": Path("models/merged")}


def push(p: Params, root: Path = Path(".")) -> dict[str, Any]:
    h = p.hub
    if not h.push:
        raise UserError("hub.push: false; set it to true to opt in to uploading")
    if not h.repo_id:
        raise UserError("hub.repo_id: required to push (e.g. your-name/minilm-sst2-lora)")
    folder = root / FOLDERS[h.folder]
    if not (folder / "README.md").is_file():
        raise UserError(f"hub.folder: {folder} has no model yet; run `dvc repro` first")
    files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
    plan = {
        "repo_id": h.repo_id,
        "private": h.private,
        "folder": str(folder),
        "files": files,
        "dry_run": h.dry_run,
    }
    if h.dry_run:
        return plan
    from huggingface_hub import HfApi

    from lorapipe.sources import hub_reachable

    if not hub_reachable():
        raise UserError("hub.push: the hub is unreachable (offline); nothing was uploaded")
    api = HfApi()
    api.create_repo(h.repo_id, private=h.private, exist_ok=True)
    plan["url"] = str(api.upload_folder(repo_id=h.repo_id, folder_path=str(folder)))
    return plan
