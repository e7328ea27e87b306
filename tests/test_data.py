import gzip

import numpy as np
import pytest
import torch

import coursekit
from coursekit import data


def test_test_split_ships_with_the_package():
    x, y = coursekit.fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
    assert len(coursekit.FASHION_CLASSES) == 10


def _write_idx(folder, stem, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(folder / (stem + ".gz"), "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_train_split_from_FASHION_MNIST_DIR(tmp_path, monkeypatch):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    _write_idx(tmp_path, "train-images-idx3-ubyte", imgs)
    _write_idx(tmp_path, "train-labels-idx1-ubyte", np.arange(5))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    x, y = coursekit.fashion_mnist("train")
    assert x.shape == (5, 1, 28, 28) and torch.equal(y, torch.arange(5))
    assert torch.allclose(x[:, 0] * 255, torch.from_numpy(imgs).float())


def test_train_split_missing_everywhere_explains_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("COURSEKIT_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "nothing")

    def offline(split):
        raise OSError("no network")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(FileNotFoundError) as err:
        coursekit.fashion_mnist("train")
    msg = str(err.value)
    assert "FASHION_MNIST_DIR" in msg and "dataset-fashion-mnist" in msg and "torchvision" in msg


def test_bad_split():
    with pytest.raises(ValueError, match="train"):
        coursekit.fashion_mnist("validation")


def test_mismatched_files(tmp_path, monkeypatch):
    _write_idx(tmp_path, "train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    _write_idx(tmp_path, "train-labels-idx1-ubyte", np.zeros(4))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="labels"):
        coursekit.fashion_mnist("train")
