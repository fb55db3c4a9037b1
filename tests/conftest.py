"""Tiny models and generated data shared by the tests (no downloads, seconds on a CPU)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(2)


class TinyNet(pl.LightningModule):
    """Conv + BatchNorm + two Linear layers over 1x8x8 inputs, 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.max_pool2d(h, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class TinyData(pl.LightningDataModule):
    """Train (256) and validation (128) splits of :func:`make_data`, for Trainer runs."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(256, seed=0), batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_data(128, seed=1), batch_size=32)


def make_data(n: int = 256, seed: int = 0) -> TensorDataset:
    """A learnable 4-class problem: the class sets the mean of one image quadrant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, 4 * r: 4 * r + 4, 4 * q: 4 * q + 4] += 1.5
    return TensorDataset(x, y)


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def loader() -> DataLoader:
    return DataLoader(make_data(), batch_size=32)


def train_briefly(model: nn.Module, loader, epochs: int = 2) -> nn.Module:
    """A few quick Adam epochs (plain loop, no Trainer); returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture
def trained(tiny_net, loader) -> TinyNet:
    """TinyNet after a few quick epochs (plain loop, no Trainer)."""
    return train_briefly(tiny_net, loader)


def snapshot(model: nn.Module) -> dict:
    """Everything about a model that a quantization run must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "types": [type(m) for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["types"] == before["types"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        torch.testing.assert_close(after["state"][k], v, rtol=0, atol=0, equal_nan=True, msg=k)
