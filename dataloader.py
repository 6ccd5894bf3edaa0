"""vadd data layer: tokenizers, datasets and dataloaders.

    raw text (data/sources.py) -> detokenize -> tokenize -> wrap or pad to model.length
    -> datasets.save_to_disk under data.cache_dir -> memory-mapped rows as torch tensors

Rows are dict(input_ids, attention_mask), LongTensors of shape (L,).
- Wrapped (data.wrap=True, MDLM's convention): every document's tokens plus EOS are
  concatenated and cut into (L-2)-token pieces framed BOS ... EOS; the remainder of each
  map batch is dropped and the attention mask is all ones.
- Unwrapped: one document per row, BOS + tokens + EOS truncated to L and padded with the
  pad id; the attention mask is 0 on padding.

The mask token is not part of any tokenizer: models use mask_id = len(tokenizer) and a
vocabulary of len(tokenizer) + 1. GPT-2 pads with EOS (50256), never with the mask (50257).

Non-text data (data.kind=grid / image: the checkerboard, MNIST, CIFAR-10) comes from
data/grid.py as fixed-length rows without framing; the loaders below serve both.
"""

import dataclasses
import itertools
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from functools import partial

import datasets
import fsspec
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import (
    PreTrainedTokenizerBase,
)

import utils
from data import grid as grid_data
from data import text_set
from data.cache import (
    PIPELINE_VERSION,
    cache_path,
    digest,
    exists,
    first_line,
    is_local,
    remove_tree,
    slug,
)
from data.order import ResumableSampler
from data.sources import DataUnavailableError, get_source
from data.tokenization import (  # noqa: F401  (re-exported: the data API lives here)
    MAP_BATCH_DOCS,
    detokenizer_for,
    get_tokenizer,
    tokenizer_fingerprint,
    tokenizer_from_state,
    tokenizer_state,
)

__all__ = ["DataUnavailableError", "get_dataloaders", "get_dataset", "get_tokenizer"]

PARALLEL_MIN_DOCS = 50_000  # below this, worker processes cost more than they save
SPLITS = {"train": "train", "validation": "validation", "valid": "validation"}


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
    if grid_data.is_grid_data(data_cfg):  # checkerboard, images: fixed rows, no tokenizer
        return grid_data.get_dataset(data_cfg, split, length)
    if data_cfg.kind == "set":  # a known finite set of sequences (data/text_set.py)
        return text_set.get_dataset(data_cfg, tokenizer, split, length)
    name = str(data_cfg.train if split == "train" else data_cfg.valid)
    source = get_source(name)
    detokenizer = detokenizer_for(data_cfg, source)
    framing = _framing(data_cfg, split, length, detokenizer)
    if data_cfg.streaming:
        return _tokenize(source.load(data_cfg, split), tokenizer, framing, detokenizer)
    key = digest([PIPELINE_VERSION, name, split, source.fingerprint(data_cfg)])
    key = digest([key, tokenizer_fingerprint(tokenizer), dataclasses.astuple(framing)])
    label = f"{name}_{split}_{slug(tokenizer.name_or_path)}_L{length}"
    path = cache_path(data_cfg, "datasets", f"{label}_{'wrap' if framing.wrap else 'pad'}_{key}")
    if exists(path):
        try:
            return _load_rows(path)
        except Exception as err:  # truncated Arrow file, lost state.json, fewer rows, ...
            print(f"[vadd] the cached rows {path} are damaged ({first_line(err)}): rebuilding")
            remove_tree(path)
    raw = source.load(data_cfg, split)
    _build(raw, tokenizer, framing, detokenizer, path, desc=f"tokenizing {name} {split}")
    return _load_rows(path)


ROWS_FILE = "vadd_rows.json"  # the row count, written last: a cache without it is partial


def _load_rows(path: str) -> datasets.Dataset:
    rows = datasets.load_from_disk(path)
    fs, root = fsspec.core.url_to_fs(path)
    marker = f"{root}/{ROWS_FILE}"
    if fs.exists(marker):  # caches from before the marker are trusted as they are
        expected = json.loads(fs.cat_file(marker))["rows"]
        if len(rows) != expected:
            raise ValueError(f"{len(rows)} rows of {expected}")
        if len(rows):
            rows[len(rows) - 1]  # reads the last record: a cut Arrow stream fails here
    return rows.with_format("torch")  # integer columns -> int64


def _framing(
    data_cfg: DictConfig, split: str, length: int, detokenizer: Callable | None
) -> Framing:
    if length < 3:
        raise ValueError(f"model.length={length}: rows need BOS, EOS and at least one token")
    insert_eos = data_cfg.get(f"insert_{'train' if split == 'train' else 'valid'}_eos", True)
    return Framing(int(length), bool(data_cfg.wrap), bool(insert_eos), detokenizer is not None)


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


# A fast tokenizer holds ~200 bytes per character while it works (a 50 MB line took
# 9.8 GB): longer documents are tokenised in pieces of at most this many characters.
PIECE_CHARS = 1 << 20


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All documents' token ids concatenated, and each document's length."""
    if max(map(len, texts), default=0) > PIECE_CHARS:
        ids = [_encode_long(tokenizer, text) for text in texts]
    else:
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
        ids = ids["input_ids"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = itertools.chain.from_iterable(ids)
    return np.fromiter(flat, dtype=np.int32, count=int(lengths.sum())), lengths


def _encode_long(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """One document's ids, tokenised piece by piece. Pieces end just before a space, where
    byte-level BPE and WordPiece pre-tokenisers split anyway (GPT-2 attaches a space to
    the word after it), so the ids equal those of the whole text."""
    ids, start = [], 0
    while start < len(text):
        end = start + PIECE_CHARS
        if end < len(text):
            cut = text.rfind(" ", start + PIECE_CHARS // 2, end)
            end = cut if cut > start else end  # no space: cut mid-word (rare: base64 blobs)
        piece = text[start:end]
        ids += tokenizer(
            piece, add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        start = end
    return ids


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
    scratch = staging if is_local(path) else tempfile.mkdtemp(prefix="vadd-map-")
    os.makedirs(scratch, exist_ok=True)
    try:
        rows = _tokenize(
            raw,
            tokenizer,
            framing,
            detokenizer,
            num_proc=_num_proc(len(raw)),
            cache_file_name=os.path.join(scratch, "map", "rows.arrow"),
            new_fingerprint=digest([path]),  # skips hashing the tokenizer
            desc=desc,
        )
        if len(rows) == 0:
            raise DataUnavailableError(
                f"{desc.removeprefix('tokenizing ')} gives no row of model.length="
                f"{framing.length} tokens ({len(raw)} documents, too little text): add text, "
                "or lower model.length"
            )
        rows.save_to_disk(f"{staging}/rows")
        with fsspec.open(f"{staging}/rows/{ROWS_FILE}", "w") as f:
            json.dump({"rows": len(rows)}, f)
        _commit(f"{staging}/rows", path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        fs, root = fsspec.core.url_to_fs(staging)
        if fs.exists(root):
            fs.rm(root, recursive=True)


def _commit(staging: str, path: str) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    if is_local(path):
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
    else:
        if train:
            dataset = dataset.shuffle(seed=int(cfg.seed), buffer_size=10_000)
        dataset = RankShard(dataset)
    num_workers = int(cfg.loader.num_workers)
    sampler = None
    if not streamed:  # seeded, sharded over ranks, resumable mid-epoch (data/order.py)
        sampler = ResumableSampler(
            len(dataset), seed=int(cfg.seed), shuffle=train, drop_last=train, batch_size=batch_size
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        # Its own generator: creating an iterator must not draw from the global RNG.
        generator=torch.Generator().manual_seed(int(cfg.seed)),
        drop_last=train,
        num_workers=num_workers,
        pin_memory=bool(cfg.loader.pin_memory) and torch.cuda.is_available(),  # else a warning
        persistent_workers=num_workers > 0,
    )


class RankShard(torch.utils.data.IterableDataset):
    """A streamed dataset read by this rank only: without it every DDP rank would read
    the same rows. Rank and world are read when iteration starts (the process group
    exists by then); datasets' split_dataset_by_node gives each rank whole shards of the
    stream when they divide evenly, else every world-th row."""

    def __init__(self, dataset: datasets.IterableDataset):
        self.dataset = dataset

    def __iter__(self):
        rank, world = utils.rank_world()
        if world == 1:
            return iter(self.dataset)
        return iter(split_dataset_by_node(self.dataset, rank=rank, world_size=world))


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
