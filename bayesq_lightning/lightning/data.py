"""Datamodules with train / calibration hold-out / test splits, and scikit-learn's digits.

Every datamodule has train / calibration hold-out / test splits; evaluation never touches data
used for curvature, calibration or distillation. The datasets that need assets installed
outside the package (Fashion-MNIST, the sentiment sentences) are in
:mod:`bayesq_lightning.datasets`.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset


class TensorDataModule(pl.LightningDataModule):
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


class DigitsDataModule(TensorDataModule):
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
