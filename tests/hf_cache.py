"""Write local Hugging Face caches in the exact layouts the libraries read offline.

* ``write_hub_repo``: the ``huggingface_hub`` cache (``HF_HUB_CACHE``):
  ``<cache>/<models|datasets>--<org>--<name>/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main}``.
* ``write_hub_dataset``: the ``datasets`` cache (``HF_DATASETS_CACHE``) of a hub dataset loaded once:
  ``<cache>/<org>___<name>/<config>/<version>/<hash>/{dataset_info.json, <name>-<split>.arrow}``,
  prepared by ``datasets``' own json builder.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_hub_repo(cache: Path, repo_id: str, files: dict, repo_type: str = "model") -> Path:
    """Put ``files`` ({name: bytes | str}) into the hub cache as repository ``repo_id``; the snapshot folder."""
    folder = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    for name, data in files.items():
        data = data.encode() if isinstance(data, str) else bytes(data)
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def write_hub_dataset(cache: Path, repo_id: str, splits: dict) -> Path:
    """A prepared copy of hub dataset ``repo_id`` ({split: list of records}) in the datasets cache."""
    import glob

    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json
    cache = Path(cache)
    name = repo_id.split("/")[-1]
    src = cache / "_src"
    src.mkdir(parents=True, exist_ok=True)
    patterns = {}
    for split, records in splits.items():
        (src / f"{split}.json").write_text(json.dumps(records))
        patterns[split] = [str(src / f"{split}.json")]
    builder = Json(cache_dir=str(cache), dataset_name=name, hash="0123456789abcdef",
                   data_files=DataFilesDict.from_patterns(patterns))
    builder.download_and_prepare()
    root = cache / name
    os.rename(glob.glob(str(root / "default-*"))[0], root / "default")  # a hub dataset's config is "default"
    target = cache / "___".join(repo_id.split("/"))
    os.rename(root, target)
    return target
