"""data=local_text: your own .txt / .jsonl files as documents, and the held-out split.

A .txt file holds one document per blank-line-separated block (paragraph), so a single
large file still yields many documents; a .jsonl file holds one document per line, in
its `text` field. A folder contributes all its .txt/.jsonl files (recursively, sorted by
path; symlinked folders are followed once). Files that are binary, not UTF-8 or
malformed JSONL are refused with one line naming the file (and line).
"""

import json
import os
from pathlib import Path

import datasets
from omegaconf import DictConfig

from data.cache import hash_files
from errors import DataUnavailableError, missing_path

TEXT_SUFFIXES = (".txt", ".jsonl")


def _local_root(data_cfg: DictConfig) -> Path:
    raw = data_cfg.get("path")
    if not raw:
        raise DataUnavailableError(
            "data.path is not set: pass data.path=/path/to/file_or_folder (.txt or .jsonl)"
        )
    path = Path(str(raw)).expanduser()
    if not path.exists():
        raise missing_path("data.path", path, DataUnavailableError)
    return path


def _local_files(data_cfg: DictConfig) -> list[Path]:
    root = _local_root(data_cfg)
    if root.is_file():
        files = [root] if root.suffix in TEXT_SUFFIXES else []
    else:
        files = sorted(_walk_text_files(root))
    if not files:
        raise DataUnavailableError(
            f"data.path={root} holds no .txt or .jsonl file: add some or change data.path"
        )
    return files


def _walk_text_files(root: Path) -> list[Path]:
    """.txt / .jsonl files below root, following symlinked folders (each real folder
    once, so a link cycle ends)."""
    found, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(folder) / n for n in names if Path(n).suffix in TEXT_SUFFIXES]
    return [p for p in found if p.is_file()]


def _read_text(path: Path) -> str:
    """A data file's text, or one line saying why it is not text."""
    data = path.read_bytes()
    if b"\0" in data[:65536]:
        raise DataUnavailableError(
            f"{path} looks binary (it has NUL bytes), not .txt/.jsonl text: remove it from "
            "data.path or convert it"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataUnavailableError(
            f"{path} is not UTF-8 (byte {err.start} of {len(data)}): convert it, e.g. "
            f"iconv -f latin1 -t utf-8, or remove it from data.path"
        ) from None


def _paragraphs(text: str) -> list[str]:
    blocks = (block.strip() for block in text.replace("\r\n", "\n").split("\n\n"))
    return [block for block in blocks if block]


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataUnavailableError(
                f"{path}:{number} is not valid JSON ({err.msg}, column {err.colno}): "
                'write one object per line, {"text": "..."}'
            ) from None
        if not isinstance(record, dict) or "text" not in record:
            raise DataUnavailableError(f"{path}:{number} has no 'text' field: add one per line")
        if not isinstance(record["text"], str):
            kind = type(record["text"]).__name__
            raise DataUnavailableError(
                f"{path}:{number}: 'text' is a {kind}, not a string: write the document as text"
            )
        texts.append(record["text"])
    return [text for text in texts if text.strip()]


def local_documents(data_cfg: DictConfig) -> list[str]:
    documents = []
    for path in _local_files(data_cfg):
        if path.suffix == ".jsonl":
            documents += _jsonl_texts(path)
        else:
            documents += _paragraphs(_read_text(path))
    if not documents:
        raise DataUnavailableError(
            f"data.path={_local_root(data_cfg)} contains no text: add text or change data.path"
        )
    return documents


# Local corpora: a share of the characters is held out, as whole documents spread over
# the corpus (a corpus of a single document is cut at a space instead). The share is
# data.valid_fraction, raised so that at least data.valid_min_chars are held out (a few
# hundred tokens are no evaluation), and never more than half of the text.
MAX_VALID_SHARE = 0.5


def valid_share(data_cfg: DictConfig, total_chars: int) -> float:
    fraction = float(data_cfg.valid_fraction)
    least = int(data_cfg.valid_min_chars) / max(total_chars, 1)
    return min(max(fraction, least), MAX_VALID_SHARE)


def held_out(lengths: list[int], share: float) -> list[bool]:
    """Which documents (by character count) are validation: each document goes where it
    keeps the held-out characters closest to share x the characters seen so far, so the
    held-out documents are spread evenly over the corpus. At least one document is held
    out and at least one is kept for training."""
    flags, held, seen = [], 0, 0
    for n in lengths:
        seen += n
        take = abs(held + n - share * seen) < abs(held - share * seen)
        flags.append(take)
        held += n if take else 0
    if len(flags) > 1 and not any(flags):
        flags[len(flags) // 2] = True
    if len(flags) > 1 and all(flags):
        flags[0] = False
    return flags


def _cut(text: str, share: float) -> tuple[str, str]:
    """A single document: (train, validation) cut at the first space after 1 - share."""
    at = int((1 - share) * len(text))
    cut = text.find(" ", at)
    cut = at if cut < 0 else cut
    return text[:cut], text[cut:]


def local_split(data_cfg: DictConfig) -> tuple[list[str], list[str], dict]:
    """(train texts, validation texts, a description of the split for the JSON files)."""
    documents = local_documents(data_cfg)
    lengths = [len(d) for d in documents]
    share = valid_share(data_cfg, sum(lengths))
    if len(documents) == 1:
        train, valid = (list(part) for part in zip(_cut(documents[0], share), strict=True))
        rule = f"one document: its last {share:.1%} of characters, cut at a space"
    else:
        flags = held_out(lengths, share)
        train = [d for d, f in zip(documents, flags, strict=True) if not f]
        valid = [d for d, f in zip(documents, flags, strict=True) if f]
        rule = f"whole documents spread over the corpus, {share:.1%} of its characters"
    held_chars = sum(map(len, valid))
    split = {
        "rule": rule,
        "documents": len(documents),
        "validation_documents": len(valid) if len(documents) > 1 else 1,
        "characters": sum(lengths),
        "validation_characters": held_chars,
        "validation_share": round(held_chars / max(sum(lengths), 1), 4),
        "valid_fraction": float(data_cfg.valid_fraction),
        "valid_min_chars": int(data_cfg.valid_min_chars),
    }
    return train, valid, split


def load_local_text(data_cfg: DictConfig, split: str) -> datasets.Dataset:
    train, valid, _ = local_split(data_cfg)
    return datasets.Dataset.from_dict({"text": train if split == "train" else valid})


def local_fingerprint(data_cfg: DictConfig) -> str:
    root = _local_root(data_cfg)
    files = hash_files(_local_files(data_cfg), root if root.is_dir() else None)
    rule = (data_cfg.valid_fraction, data_cfg.valid_min_chars)
    return f"{files}|valid={rule}"  # the split decides which text each cache holds
