"""Accuracy, NLL and ECE of a classifier over a loader (torchmetrics, synced across ranks)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from .batches import LogitsModel, inputs_to, split_batch


def _metric_objects(n_classes: int, device) -> dict:
    """The three metrics every report uses: micro accuracy, mean NLL, 15-bin L1 ECE."""
    return {"accuracy": MulticlassAccuracy(num_classes=n_classes, average="micro").to(device),
            "nll": MeanMetric().to(device),
            "ece": MulticlassCalibrationError(num_classes=n_classes, n_bins=15,
                                              norm="l1").to(device)}


def _update(metrics: dict, logits: torch.Tensor, labels: torch.Tensor) -> None:
    probs = logits.softmax(-1)
    metrics["accuracy"].update(probs, labels)
    metrics["ece"].update(probs, labels)
    metrics["nll"].update(F.cross_entropy(logits, labels, reduction="none"))


def _labelled_logits(model: nn.Module, loader: Iterable, max_batches: int | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits, labels)`` per batch, the model in eval mode (restored afterwards)."""
    net = LogitsModel(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = split_batch(batch)
            if y is None:
                raise ValueError("evaluation needs labelled batches: (inputs, targets) or dicts "
                                 "with a 'labels' key")
            yield net(inputs_to(x, device)).float(), y.to(device)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, max_batches: int | None = None
) -> dict[str, float]:
    """``{"accuracy", "nll", "ece"}`` of ``model`` on labelled batches.

    Accuracy is micro-averaged (plain accuracy); ECE is ``MulticlassCalibrationError`` with 15
    bins on softmax probabilities; NLL is the mean negative log-likelihood. Under an initialised
    process group every rank must call this (torchmetrics syncs on ``compute``).
    """
    metrics = None
    for logits, y in _labelled_logits(model, loader, max_batches):
        if metrics is None:
            metrics = _metric_objects(logits.shape[-1], logits.device)
        _update(metrics, logits, y)
    if metrics is None:
        raise ValueError("the evaluation loader yielded no batches")
    return {k: float(m.compute()) for k, m in metrics.items()}


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of ``model`` over every labelled batch of ``loader`` (CPU, fp32)."""
    pairs = [(logits.cpu(), y.cpu()) for logits, y in _labelled_logits(model, loader)]
    if not pairs:
        raise ValueError("the evaluation loader yielded no batches")
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{"accuracy", "nll", "ece"}`` of precomputed logits (the metrics of :func:`evaluate`)."""
    metrics = _metric_objects(logits.shape[-1], logits.device)
    _update(metrics, logits, labels)
    return {k: float(m.compute()) for k, m in metrics.items()}


def bootstrap_se(values, n_boot: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of the mean of per-example ``values``.

    Pass per-example differences of two models on the same examples (e.g. correctness of A
    minus correctness of B) for a *paired* standard error.
    """
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    return float(values[idx].mean(axis=1).std(ddof=1))
