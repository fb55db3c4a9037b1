"""Reference classifiers of the demo, the CLI configs and the benchmarks: small CNNs and a
HuggingFace sequence classifier over a local model directory."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from ..progress import transformers_bars


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


def resolve_model_dir(model_dir: str | None = None) -> str:
    """A local HuggingFace model directory: ``model_dir``, or the offline MiniLM when ``None``.

    Never a Hub name: a path without ``config.json`` is an error here, before ``transformers``
    could try the network. ``None`` is the fixture
    :func:`bayesq_lightning.datasets.minilm.minilm_dir` (imported only then).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if model_dir is None:
        from ..datasets.minilm import minilm_dir

        return minilm_dir()
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(
            f"HuggingFace model directory {str(path)!r} {what}; pass a local directory written "
            "by save_pretrained (models are never downloaded), or omit it for the offline MiniLM"
        )
    return str(path)


class HFSequenceClassifier(pl.LightningModule):
    """A HuggingFace sequence classifier on dict batches (``input_ids``, ``attention_mask``,
    ``labels``), loaded with ``AutoModelForSequenceClassification.from_pretrained(model_dir)``.

    ``forward`` takes the batch dict (labels ignored) and returns logits. Its Linear layers
    (encoder, pooler, classifier) are what BayesQ quantizes; embeddings and LayerNorms have no
    quantizable layer type and stay in floating point.

    Args:
        model_dir: local HuggingFace directory (default: the offline MiniLM, see
            :func:`resolve_model_dir`).
        num_labels: number of classes (a new head when it differs from the saved one).
        lr: AdamW learning rate of fine-tuning.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, model_dir: str | None = None, num_labels: int = 2, lr: float = 5e-5,
                 weight_decay: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        path = resolve_model_dir(model_dir)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized head" is expected here
        try:
            with transformers_bars():  # "Loading weights" only on a terminal
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model.train()  # from_pretrained returns eval mode; Lightning switches modes itself
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch)
        self.log("val/loss", F.cross_entropy(logits, batch["labels"]), prog_bar=True)
        self.log("val/acc", (logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
