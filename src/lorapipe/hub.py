"""The Hugging Face hub: whether it answers, the one-line offline error, and the opt-in push of
the adapter or merged model (`lorapipe push`).

The push is not a DVC stage: an upload is a side effect, not an artifact. The token comes from the
environment (HF_TOKEN) or huggingface-cli login and is never written anywhere.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lorapipe.config import Params, UserError

FOLDERS = {"adapter": Path("models/adapter"), "merged": Path("models/merged")}


def hub_reachable() -> bool:
    """One quick connect instead of huggingface_hub's ~25 s of retries when offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


def offline_error(field: str, kind: str, repo_id: str, hint: str) -> UserError:
    return UserError(
        f"{field}: '{repo_id}' is a hub {kind} id, the hub is unreachable (offline) and it is "
        f"not in the local cache; {hint}"
    )


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

    if not hub_reachable():
        raise UserError("hub.push: the hub is unreachable (offline); nothing was uploaded")
    api = HfApi()
    api.create_repo(h.repo_id, private=h.private, exist_ok=True)
    plan["url"] = str(api.upload_folder(repo_id=h.repo_id, folder_path=str(folder)))
    return plan
