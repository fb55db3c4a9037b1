"""Fashion-MNIST from the IDX gzip files of Debian's ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..lightning.data import TensorDataModule

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> dict[str, torch.Tensor]:
    """Fashion-MNIST from IDX gzip files (``apt-get install dataset-fashion-mnist``).

    Returns ``train_x`` / ``test_x`` as ``(n, 1, 28, 28)`` float images normalised to
    ``(x / 255 - 0.286) / 0.353`` and ``train_y`` / ``test_y`` as class indices.
    """
    root = Path(root)
    names = {
        "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
        "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in names.values() if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found under {root}; install them with "
            "`apt-get install dataset-fashion-mnist` (or pass root=...)"
        )
    out = {}
    for key, name in names.items():
        arr = torch.from_numpy(_read_idx(root / name).copy())
        if key.endswith("_x"):
            out[key] = ((arr.float() / 255.0 - 0.286) / 0.353).unsqueeze(1)
        else:
            out[key] = arr.long()
    return out


class FashionMNISTDataModule(TensorDataModule):
    """Fashion-MNIST: 60k train (minus a ``calib_samples`` hold-out) / 10k test."""

    def __init__(self, root: str = str(FASHION_MNIST_DIR), batch_size: int = 128,
                 calib_samples: int = 512, seed: int = 0) -> None:
        super().__init__(batch_size, calib_samples, seed)
        self.root = root

    def _load(self) -> tuple[TensorDataset, TensorDataset]:
        d = load_fashion_mnist(self.root)
        return TensorDataset(d["train_x"], d["train_y"]), TensorDataset(d["test_x"], d["test_y"])
