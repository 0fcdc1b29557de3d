"""Models and bundles by name: a local directory, or a Hugging Face hub repo id (``owner/name``).

A repo id is fetched with ``huggingface_hub.snapshot_download``: the usual cache (``HF_HOME`` /
``HF_HUB_CACHE``), ``revision`` pinning (a branch, tag or commit), and ``HF_HUB_OFFLINE=1``
(the cached snapshot, never the network). A local path always wins over a repo id of the same
name. Torch-free: the runtime's ``Scorer`` resolves bundles through it too.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# owner/name, as the hub spells them (letters, digits, "-", "_", "."; no "..", no leading "-" or ".")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def is_repo_id(name: str | os.PathLike) -> bool:
    s = str(name)
    return bool(REPO_ID.match(s)) and ".." not in s and not s.endswith(".")


def cache_repo_dir(path: str | os.PathLike) -> Path | None:
    """The hub cache folder of the repo whose snapshot ``path`` is (``.../models--o--n/snapshots/<commit>``),
    else None: the snapshot's files are links into its ``blobs/``."""
    p = Path(path).absolute()
    repo = p.parent.parent
    if p.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")):
        return repo
    return None


def resolve(name_or_path: str | os.PathLike, revision: str | None = None, local_files_only: bool = False) -> Path:
    """The local directory of ``name_or_path``: itself if it exists, else the snapshot of the hub
    repo of that id (downloaded into the cache unless offline or ``local_files_only``: then only
    the cache is read, as in transformers)."""
    path = Path(name_or_path)
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} pins a hub repo; {path} is a local directory")
        return path
    if not is_repo_id(name_or_path):
        raise FileNotFoundError(f"{path} not found: not a local path, and not a hub repo id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError as e:
        raise ImportError(f"{name_or_path} is not a local directory; loading it from the Hugging Face hub "
                          "needs huggingface_hub (pip install huggingface_hub)") from e
    at = f"{name_or_path}@{revision}" if revision else str(name_or_path)
    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, local_files_only=local_files_only))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{at} is neither a local directory nor in the hub cache, and the hub could not be "
                                f"reached (HF_HUB_OFFLINE or local_files_only set, or no network): {e}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{at} is neither a local directory nor a hub repo and revision you can read: "
                                f"{type(e).__name__}") from None


def push_to_hub(directory: str | os.PathLike, repo_id: str, revision: str | None = None, private: bool | None = None,
                commit_message: str | None = None, token: str | None = None, api: object | None = None) -> str:
    """Upload a bundle or a saved model directory to hub repo ``repo_id`` (created if missing) and
    return the commit URL. A bundle is verified first (a changed file is never published); a model
    directory must hold ``config.json`` and safetensors weights. ``api``: an ``HfApi`` (default: a new one)."""
    from .runtime.bundle import MANIFEST_NAME, verify_bundle

    root = Path(directory)
    if not is_repo_id(repo_id):
        raise ValueError(f"repo_id must be owner/name, got {repo_id!r}")
    if (root / MANIFEST_NAME).is_file():
        verify_bundle(root)
        what = "bundle"
    elif (root / "config.json").is_file() and any(root.glob("*.safetensors")):
        what = "model"
    else:
        raise FileNotFoundError(f"{root} is neither a bundle (manifest.json) nor a saved model (config.json and "
                                "safetensors weights)")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(folder_path=str(root), repo_id=repo_id, revision=revision,
                             commit_message=commit_message or f"Upload zreward-fast {what}")
    return str(getattr(info, "commit_url", info))
