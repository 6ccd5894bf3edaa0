"""Where processed data and trained tokenizers live under data.cache_dir (any fsspec path)."""

import hashlib
import json
import os
import re

import fsspec
from omegaconf import DictConfig

import utils

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


def write_atomically(path: str, text: str) -> None:
    utils.atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def digest(parts: list) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(text)).strip("-") or "tokenizer"
