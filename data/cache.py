"""Where processed data and trained tokenizers live under data.cache_dir (any fsspec path)."""

import hashlib
import json
import os
import re
from pathlib import Path

import fsspec
from omegaconf import DictConfig

PIPELINE_VERSION = 1  # part of every cache key: bump it when the processing changes


def cache_path(data_cfg: DictConfig, kind: str, name: str) -> str:
    root = str(data_cfg.cache_dir)
    root = os.path.expanduser(root) if is_local(root) else root.rstrip("/")
    return f"{root}/{kind}/{name}"


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def exists(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)


def remove_tree(path: str) -> None:
    """Delete a cache entry (file or folder); gone already is fine (another rank did it)."""
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(root):
        try:
            fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass


def first_line(err: BaseException) -> str:
    """'TypeName: first line of the message', short enough for a one-line report."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"


def digest(parts: list) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(text)).strip("-") or "tokenizer"


def hash_files(paths: list[Path], root: Path | None = None) -> str:
    digest = hashlib.sha1()
    for path in paths:
        digest.update(str(path.relative_to(root) if root else path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
