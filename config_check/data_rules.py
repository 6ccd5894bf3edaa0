"""Rules on the data groups: the data kind, local folders of non-text data, toy models."""

import os

from omegaconf import DictConfig

import algorithms
from config_check.values import _check_range
from errors import ConfigError

# Non-text data (data.kind=grid / image, data/grid.py): what a local folder must hold.
DATA_KINDS = ["text", "grid", "image", "set"]

LOCAL_FOLDERS = {
    "mnist_local": "train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]",
    "cifar10_local": "CIFAR-10's python batches (cifar-10-batches-py: data_batch_1..5, test_batch)",
}


def data_kind(cfg: DictConfig) -> str:
    """text (tokenised corpora), grid (the checkerboard), image (MNIST, CIFAR-10) or set
    (a known finite set of text sequences, data/text_set.py). The data group says which:
    the rest of the code reads data.kind without a default."""
    kind = cfg.data.get("kind")
    if kind is None:
        raise ConfigError(
            f"data={cfg.data.get('name')} has no data.kind: add 'kind: text' (or grid, image, "
            "set) to its file in configs/data/"
        )
    return kind


def _check_data(cfg):
    kind = data_kind(cfg)
    if kind not in DATA_KINDS:
        raise ConfigError(f"data.kind={kind!r} is not one of {DATA_KINDS}")
    if cfg.model.type == "toy_mlp":
        _check_toy_mlp(cfg, kind)
    if kind == "text":
        if cfg.data.get("valid") == "local_text":
            _check_range(cfg, "data.valid_fraction", 0.0, 0.5, False)
            _check_range(cfg, "data.valid_min_chars", 0, None, True)
        if cfg.model.length < 3:
            raise ConfigError(
                f"model.length={cfg.model.length} is too short for text: every row holds BOS "
                "and EOS around its tokens; set model.length >= 3 (MDLM: 1024)"
            )
        return
    if kind == "set":
        _check_range(cfg, "data.num_sequences", 1, None, True)
        _check_range(cfg, "data.repeats", 1, None, True)
        return
    _check_local_folder(cfg)
    _check_grid_data(cfg, kind)


def _check_grid_data(cfg, kind):
    d, name = cfg.data, cfg.data.name
    shape = list(d.shape)
    length = 1
    for dim in shape:
        length *= int(dim)
    if cfg.model.length != length:
        dims = " x ".join(str(dim) for dim in shape)
        raise ConfigError(
            f"model.length={cfg.model.length} but data={name} rows have {length} tokens "
            f"({dims}): set model.length={length}"
        )
    key, lo, hi = ("levels", 2, 256) if kind == "image" else ("bins", 1, None)
    _check_range(cfg, f"data.{key}", lo, hi, True)
    for key in ("prefix", "suffix", "template"):
        if cfg.sampling.get(key):
            raise ConfigError(
                f"sampling.{key} conditions on text, but data={name} has none: drop sampling.{key}"
            )
    if cfg.eval.compute_generative_perplexity:
        raise ConfigError(
            f"eval.compute_generative_perplexity=True scores text with a judge LM, but "
            f"data={name} is not text: set eval.compute_generative_perplexity=False "
            "(sample_eval reports JS divergence / writes an image grid instead)"
        )


def _check_local_folder(cfg):
    name = str(cfg.data.train)
    if name not in LOCAL_FOLDERS:
        return
    path = cfg.data.get("path")
    if not path:
        raise ConfigError(
            f"data={cfg.data.name} reads a local copy and data.path is not set: pass "
            f"data.path=<folder holding {LOCAL_FOLDERS[name]}>"
        )
    if "://" not in str(path) and not os.path.isdir(os.path.expanduser(str(path))):
        raise ConfigError(
            f"data.path={path} is not a folder: point it at the folder holding "
            f"{LOCAL_FOLDERS[name]}"
        )


def _check_toy_mlp(cfg, kind):
    if kind != "grid":
        raise ConfigError(
            f"model=toy_mlp is an MLP for 2-token toy data (data=checkerboard), not "
            f"data={cfg.data.name}: use a DiT model group (model=cpu, or model=pixel_tiny "
            "for images)"
        )
    if not cfg.model.latent1d:
        raise ConfigError(
            "model=toy_mlp draws one z per sequence: set model.latent1d=True "
            "(per-position latents need a DiT model group)"
        )
    if algorithms.algorithm_class(cfg).uses_latent and not cfg.decoder.get("emb_dim"):
        raise ConfigError(
            f"model=toy_mlp needs its MLP encoder sizes (decoder.emb_dim), but "
            f"decoder={cfg.decoder.name} is a DiT group: use decoder=toy_mlp"
        )
