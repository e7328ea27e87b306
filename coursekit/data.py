"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, MIT licence), offline first.

The 10k test split ships with coursekit. The 60k training split is looked for, in order, in
``$FASHION_MNIST_DIR``, Debian's ``dataset-fashion-mnist`` folder, torchvision's download cache, and
finally downloaded by torchvision when online.
"""

from __future__ import annotations

import gzip
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .nets import FASHION_CLASSES

__all__ = ["fashion_mnist", "FASHION_CLASSES", "DEBIAN_FASHION_DIR"]

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _cache_dir() -> Path:
    return Path(os.environ.get("COURSEKIT_DATA", Path.home() / ".cache" / "coursekit"))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    # IDX header: 2 zero bytes, dtype code 0x08 (uint8), ndim, then ndim big-endian uint32 sizes
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not a uint8 IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidate_dirs(split: str) -> list[Path]:
    dirs = []
    if split == "test":
        dirs.append(Path(str(resources.files("coursekit") / "data")))
    if os.environ.get("FASHION_MNIST_DIR"):
        dirs.append(Path(os.environ["FASHION_MNIST_DIR"]))
    dirs += [DEBIAN_FASHION_DIR, _cache_dir() / "FashionMNIST" / "raw"]
    return dirs


def _download(split: str) -> Path:
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(_cache_dir()), train=(split == "train"), download=True)
    return _cache_dir() / "FashionMNIST" / "raw"


def fashion_mnist(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images and labels.

    Parameters
    ----------
    split : {"test", "train"}

    Returns
    -------
    x : Tensor (N, 1, 28, 28), float32 in [0, 1]
    y : Tensor (N,), int64 class indices into :data:`FASHION_CLASSES`
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_stem, lbl_stem = _FILES[split]
    for folder in _candidate_dirs(split):
        img, lbl = _find(folder, img_stem), _find(folder, lbl_stem)
        if img and lbl:
            break
    else:
        try:
            folder = _download(split)
        except Exception as err:  # re-raised with what the student can do about it
            raise FileNotFoundError(
                f"Fashion-MNIST {split!r} split not found offline and the download failed ({err}). Three ways to get it:\n"
                f"  1. online: coursekit downloads it with torchvision into {_cache_dir()} on first use;\n"
                f"  2. put {img_stem}.gz and {lbl_stem}.gz in a folder and set FASHION_MNIST_DIR to it;\n"
                f"  3. on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist (files in {DEBIAN_FASHION_DIR})."
            ) from err
        img, lbl = _find(folder, img_stem), _find(folder, lbl_stem)
    x = torch.from_numpy(_read_idx(img).copy()).float().div_(255.0)[:, None]  # (N,1,28,28)
    y = torch.from_numpy(_read_idx(lbl).astype(np.int64))  # (N,)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{img} has {x.shape[0]} images but {lbl} has {y.shape[0]} labels")
    return x, y
