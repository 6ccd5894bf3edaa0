"""Image data: binarised MNIST (shipped), local MNIST / CIFAR-10 files, and a tiny pixel VADD.

The local loaders read small files this module writes itself in the real formats (idx,
gzipped idx, CIFAR-10 python pickles). The training test runs main.py's job in-process.
"""

import csv
import gzip
import json
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra_jobs import compose_job, one_thread, run_job
from omegaconf import OmegaConf

from config_check import ConfigError, validate_config
from data import grid as grid_data
from data import images as image_data
from data.sources import DataUnavailableError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PIXEL_MICRO = [  # ~10k parameters per network over the full 784 pixels
    "data=binarized_mnist",
    "model=pixel_tiny",
    "model.hidden_size=32",
    "model.n_blocks=1",
    "model.latent_dim=8",
    "decoder.n_blocks=1",
]


def data_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


# ---------------------------------------------------------------- binarised MNIST (shipped)


def test_binarized_mnist_rows_values_and_split():
    d = data_cfg("binarized_mnist")
    train = grid_data.get_dataset(d, "train", 784).rows
    valid = grid_data.get_dataset(d, "validation", 784).rows
    assert train.shape == (4500, 784) and valid.shape == (500, 784)
    assert train.dtype == torch.long and set(train.unique().tolist()) == {0, 1}
    assert 0.08 < train.float().mean() < 0.25  # digits are mostly background
    # Every 10th line of the shipped file (500 per digit, in label order) is validation:
    table = np.loadtxt(image_data.mnist_5k_file(), delimiter=",", dtype=np.int64)
    labels = table[:, -1]
    assert np.bincount(labels[::10]).tolist() == [50] * 10
    assert torch.equal(valid, torch.from_numpy((table[::10, :-1] >= 128).astype(np.int64)))
    rest = np.arange(len(table)) % 10 != 0
    assert torch.equal(train, torch.from_numpy((table[rest, :-1] >= 128).astype(np.int64)))


def test_quantize_threshold_and_levels():
    images = np.array([0, 127, 128, 255], dtype=np.uint8).reshape(1, 2, 2, 1)
    assert image_data.quantize(images, 2).tolist() == [[0, 0, 1, 1]]
    assert image_data.quantize(images, 256).tolist() == [[0, 127, 128, 255]]
    assert image_data.quantize(images, 4).tolist() == [[0, 1, 2, 3]]


# ---------------------------------------------------------------- local MNIST (idx files)


def write_idx(path: Path, images: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, images.ndim]) + struct.pack(f">{images.ndim}I", *images.shape)
    data = header + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def random_images(n: int, shape: tuple, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_mnist_idx_loader_plain_and_gzipped(tmp_path):
    train, test = random_images(6, (28, 28), 0), random_images(3, (28, 28), 1)
    write_idx(tmp_path / "train-images-idx3-ubyte", train)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test, compress=True)
    assert np.array_equal(image_data.mnist_folder(tmp_path, "train")[..., 0], train)
    assert np.array_equal(image_data.mnist_folder(tmp_path, "validation")[..., 0], test)
    d = data_cfg("mnist_local", path=str(tmp_path))
    rows = grid_data.get_dataset(d, "validation", 784).rows
    assert torch.equal(rows, torch.from_numpy(test.reshape(3, 784) >= 128).long())
    d.levels = 256
    raw = grid_data.get_dataset(d, "train", 784).rows  # every grey level kept
    assert torch.equal(raw[2], torch.from_numpy(train[2]).flatten().long())


def test_mnist_idx_loader_refuses_bad_files(tmp_path):
    with pytest.raises(DataUnavailableError, match="no MNIST train images"):
        image_data.mnist_folder(tmp_path, "train")
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x03" + bytes(12))  # type 0x0d = float, not ubyte
    with pytest.raises(DataUnavailableError, match="bad header"):
        image_data.mnist_folder(tmp_path, "train")
    write_idx(path, random_images(2, (28, 28), 0))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataUnavailableError, match="truncated"):
        image_data.mnist_folder(tmp_path, "train")


# ---------------------------------------------------------------- local CIFAR-10 (pickles)


def write_cifar_batch(path: Path, planes: np.ndarray) -> None:
    """planes (N, 3, 32, 32) uint8 -> CIFAR-10's python batch format (a pickled dict)."""
    batch = {
        b"batch_label": b"testing batch",
        b"labels": list(range(len(planes))),
        b"data": planes.reshape(len(planes), 3072),
        b"filenames": [f"img{i}.png".encode() for i in range(len(planes))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_loader_reads_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    parts = [random_images(n, (3, 32, 32), seed) for seed, n in enumerate([2, 3, 4])]
    write_cifar_batch(folder / "data_batch_1", parts[0])
    write_cifar_batch(folder / "data_batch_2", parts[1])
    write_cifar_batch(folder / "test_batch", parts[2])
    train = image_data.cifar10_folder(tmp_path, "train")  # the parent folder works too
    assert train.shape == (5, 32, 32, 3)
    planes = np.concatenate(parts[:2])
    assert np.array_equal(train, planes.transpose(0, 2, 3, 1))  # channels last
    d = data_cfg("cifar10_local", path=str(folder))
    rows = grid_data.get_dataset(d, "validation", 3072).rows
    h, w = 5, 17  # row = raster order, R G B of a pixel side by side
    pixel = rows[1, (h * 32 + w) * 3 : (h * 32 + w) * 3 + 3]
    assert pixel.tolist() == parts[2][1, :, h, w].tolist()


def test_cifar10_loader_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        image_data.cifar10_folder(tmp_path, "validation")
    with pytest.raises(DataUnavailableError, match="no CIFAR-10 data_batch"):
        image_data.cifar10_folder(tmp_path, "train")


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data=mnist_local"], "data.path is not set: pass data.path=<folder holding train-images"),
        (["data=cifar10_local", "data.path=/nonexistent/cifar"], "data.path=/nonexistent/cifar is"),
        (["data=binarized_mnist"], "model.length=128 but data=binarized_mnist rows have 784"),
        (
            ["data=binarized_mnist", "model=pixel_tiny", "backbone=ar", "parameterization=ar"],
            "backbone=ar needs text data",
        ),
        (
            ["data=binarized_mnist", "model=pixel_tiny", "eval.compute_generative_perplexity=True"],
            "set eval.compute_generative_perplexity=False",
        ),
        (["data=binarized_mnist", "model=pixel_tiny", "data.levels=1"], "data.levels=1 is out"),
    ],
)
def test_bad_image_configs_fail_with_the_fix(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(compose_job(tmp_path, *overrides))


# ---------------------------------------------------------------- training, BPD, samples


def val_bits_per_dim(run: Path) -> list[tuple[int, float]]:
    with open(run / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/bits_per_dim")]
    return [(int(r["step"]), float(r["val/bits_per_dim"])) for r in rows]


def test_tiny_pixel_vadd_bpd_decreases_and_writes_a_sample_grid(tmp_path):
    """200 steps of 4 digits: bits/dim falls from 1 (untrained: uniform over 2 levels) to
    below 0.8 by step 50 (the pixel marginals), and on by step 200 (the digits' shapes)."""
    common = [*PIXEL_MICRO, "recipe=mnist", "training.loss_type=vae", "trainer.limit_val_batches=2"]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    with one_thread():
        run_job(
            tmp_path, *common, "loader.global_batch_size=4", "trainer.max_steps=200",
            "trainer.val_check_interval=50", "training.kl_weight_interval=100",
        )  # fmt: skip
        run_job(tmp_path / "eval", *common, "mode=ppl_eval", f"eval.checkpoint_path={ckpt}")
        run_job(
            tmp_path / "eval", *common, "mode=sample_eval", f"eval.checkpoint_path={ckpt}",
            "sampling.steps=4", "loader.eval_global_batch_size=16", "data.grid_images=16",
        )  # fmt: skip
    curve = val_bits_per_dim(tmp_path)
    assert [step for step, _ in curve] == [49, 99, 149, 199]
    first, last = curve[0][1], curve[-1][1]
    assert first < 0.8 and last < first - 0.02 and last == min(b for _, b in curve), curve
    report = json.loads((tmp_path / "eval" / "ppl_eval.json").read_text())
    assert report["bits_per_dim"] == pytest.approx(report["nll"] / np.log(2))
    assert report["bits_per_dim"] < first
    samples = json.loads((tmp_path / "eval" / "samples_vae_T4_fixzTrue_seed1.json").read_text())
    assert samples["num_samples"] == 16 and samples["images_in_grid"] == 16
    assert all(set(row) <= {0, 1} and len(row) == 784 for row in samples["token_ids"])
    png = tmp_path / "eval" / "samples_vae_T4_fixzTrue_seed1.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", png.read_bytes()[16:24])
    assert (width, height) == (3 * (8 * 29 + 1), 3 * (2 * 29 + 1))  # 8 x 2 digits, borders
