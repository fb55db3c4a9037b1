"""Small reference classifiers used by the demo, the CLI configs and the benchmarks."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F


class ImageClassifier(pl.LightningModule):
    """Shared Lightning plumbing: cross-entropy training, validation accuracy, AdamW."""

    def __init__(self, lr: float = 2e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(ImageClassifier):
    """A 3-conv + 2-FC CNN for 8x8 digits; weights spread over five layers."""

    def __init__(
        self, channels: tuple[int, int, int] = (16, 32, 64), hidden: int = 64,
        n_classes: int = 10, lr: float = 2e-3, weight_decay: float = 1e-4,
    ) -> None:
        super().__init__(lr, weight_decay)
        self.save_hyperparameters()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            _conv_bn(1, c1), _conv_bn(c1, c2), nn.MaxPool2d(2), _conv_bn(c2, c3)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * 16, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Residual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(c_in, c_out, stride),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.skip = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class SmallResNet(ImageClassifier):
    """ResNet-style CNN for 28x28 grayscale images (several residual stages with BatchNorm)."""

    def __init__(
        self, widths: tuple[int, ...] = (16, 32, 64), n_classes: int = 10,
        in_channels: int = 1, lr: float = 2e-3, weight_decay: float = 1e-4,
    ) -> None:
        super().__init__(lr, weight_decay)
        self.save_hyperparameters()
        layers: list[nn.Module] = [_conv_bn(in_channels, widths[0])]
        c = widths[0]
        for i, w in enumerate(widths):
            layers += [_Residual(c, w, 1 if i == 0 else 2), _Residual(w, w, 1)]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
