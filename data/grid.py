"""Non-text data: fixed-length rows of symbols (data.kind=grid or image), and their scores.

    data=checkerboard      2 tokens per row: the bins of a point's x and y (data/toy.py)
    data=binarized_mnist   784 tokens per row: MNIST pixels at data.levels=2 (data/images.py)
    data=mnist_local       the same from the full MNIST idx files under data.path
    data=cifar10_local     3072 tokens per row: CIFAR-10 pixels (H, W, C order), 256 levels

Rows are dict(input_ids=LongTensor (L,)) with L = prod(data.shape): no BOS / EOS, no
padding, so there is no attention mask and every token counts in the bound (per token =
per dimension). Token ids are the symbols themselves (tokenization.GridTokenizer); the
[MASK] id is the number of symbols. Nothing is cached: every source loads in a second.

`score_samples` is sample_eval's report for these data: the exact Jensen-Shannon
divergence for the checkerboard, a PNG of the samples for both kinds.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from data import images as image_data
from data import toy as toy_data
from data.sources import DataUnavailableError

KINDS = ("grid", "image")


def is_grid_data(data_cfg: DictConfig) -> bool:
    return data_cfg.kind in KINDS


class TokenRows(torch.utils.data.Dataset):
    """Rows of a (N, L) LongTensor as dict(input_ids=(L,))."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index]}


# ---------------------------------------------------------------- sources


def _checkerboard(data_cfg: DictConfig, split: str) -> torch.Tensor:
    """Fresh draws from the exact density: training from seed 2 * data.seed, validation from
    2 * data.seed + 1 (disjoint streams), train_size / valid_size points."""
    train = split == "train"
    gen = torch.Generator().manual_seed(2 * int(data_cfg.seed) + (0 if train else 1))
    n = int(data_cfg.train_size if train else data_cfg.valid_size)
    return toy_data.sample_tokens(n, int(data_cfg.bins), gen)


def _images(load: Callable[[DictConfig, str], np.ndarray]):
    def source(data_cfg: DictConfig, split: str) -> torch.Tensor:
        rows = image_data.quantize(load(data_cfg, split), int(data_cfg.levels))
        return torch.from_numpy(rows)

    return source


def _local(data_cfg: DictConfig) -> Path:
    if not data_cfg.get("path"):  # config_check says so earlier; kept for direct callers
        raise DataUnavailableError(f"data={data_cfg.name} needs data.path=<folder>")
    return Path(str(data_cfg.path)).expanduser()


SOURCES: dict[str, Callable[[DictConfig, str], torch.Tensor]] = {
    "checkerboard": _checkerboard,
    "binarized_mnist": _images(lambda d, split: image_data.mnist_5k(split)),
    "mnist_local": _images(lambda d, split: image_data.mnist_folder(_local(d), split)),
    "cifar10_local": _images(lambda d, split: image_data.cifar10_folder(_local(d), split)),
}


def get_dataset(data_cfg: DictConfig, split: str, length: int) -> TokenRows:
    """Rows of data.train ('train') or data.valid ('validation') as a TokenRows dataset."""
    name = str(data_cfg.train if split == "train" else data_cfg.valid)
    if name not in SOURCES:
        raise DataUnavailableError(f"unknown dataset '{name}': use one of {sorted(SOURCES)}")
    rows = SOURCES[name](data_cfg, split)
    if rows.shape[1] != length:
        raise DataUnavailableError(
            f"dataset '{name}' has rows of {rows.shape[1]} tokens but model.length={length}: "
            f"set model.length={rows.shape[1]}"
        )
    return TokenRows(rows.long().contiguous())


# ---------------------------------------------------------------- sample_eval reports


def score_samples(data_cfg: DictConfig, tokens: torch.Tensor, out_prefix: str) -> dict:
    """Scores of sampled rows (N, L); writes `<out_prefix>.png`."""
    if len(tokens) == 0:
        return {}
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)  # PNGs are written locally
    if data_cfg.kind == "image":
        shape = tuple(int(d) for d in data_cfg.shape)
        grid = tokens[: int(data_cfg.grid_images)].numpy()
        image_data.save_image_grid(f"{out_prefix}.png", grid, shape, int(data_cfg.levels))
        return {"image_grid": f"{out_prefix}.png", "images_in_grid": len(grid)}
    return checkerboard_scores(tokens, int(data_cfg.bins), f"{out_prefix}.png")


def checkerboard_scores(tokens: torch.Tensor, bins: int, png: str) -> dict:
    """Exact JS divergence (nats) of the samples' histogram to the true grid distribution,
    beside the JS of as many exact draws (the sampling-noise floor) and of the product of
    the true marginals (what one-step MDM gives)."""
    target = toy_data.exact_distribution(bins)
    hist = toy_data.histogram(tokens, bins)
    truth = toy_data.sample_tokens(len(tokens), bins, torch.Generator().manual_seed(0))
    _plot_checkerboard(png, target, hist)
    return {
        "js_divergence": toy_data.js_divergence(hist, target),
        "js_units": "nats (natural log); 0 <= JS <= log 2 = 0.6931",
        "js_sampling_floor": toy_data.js_divergence(toy_data.histogram(truth, bins), target),
        "js_product_of_marginals": toy_data.js_divergence(
            toy_data.product_of_marginals(target), target
        ),
        "histogram_png": png,
    }


def _plot_checkerboard(path: str, target: torch.Tensor, hist: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(5.0, 2.6))
    extent = (toy_data.LOW, toy_data.HIGH, toy_data.LOW, toy_data.HIGH)
    titles = ("exact", f"samples, JS {toy_data.js_divergence(hist, target):.4f}")
    for ax, grid, title in zip(axes, (target, hist), titles, strict=True):
        ax.imshow(grid.T.numpy(), origin="lower", extent=extent, cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
