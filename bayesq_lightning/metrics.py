"""Accuracy, NLL and ECE of a classifier over a loader (torchmetrics, synced across ranks)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from .batches import LogitsModel, inputs_to, split_batch


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, max_batches: int | None = None
) -> dict[str, float]:
    """``{"accuracy", "nll", "ece"}`` of ``model`` on labelled batches.

    Accuracy is micro-averaged (plain accuracy); ECE is ``MulticlassCalibrationError`` with 15
    bins on softmax probabilities; NLL is the mean negative log-likelihood. Under an initialised
    process group every rank must call this (torchmetrics syncs on ``compute``).
    """
    net = LogitsModel(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    acc = ece = None
    nll = MeanMetric().to(device)
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = split_batch(batch)
            if y is None:
                raise ValueError("evaluation needs labelled batches: (inputs, targets) or dicts "
                                 "with a 'labels' key")
            x = inputs_to(x, device)
            y = y.to(device)
            logits = net(x).float()
            if acc is None:
                c = logits.shape[-1]
                acc = MulticlassAccuracy(num_classes=c, average="micro").to(device)
                ece = MulticlassCalibrationError(num_classes=c, n_bins=15, norm="l1").to(device)
            probs = logits.softmax(-1)
            acc.update(probs, y)
            ece.update(probs, y)
            nll.update(F.cross_entropy(logits, y, reduction="none"))
    finally:
        model.train(was_training)
    if acc is None:
        raise ValueError("the evaluation loader yielded no batches")
    return {"accuracy": float(acc.compute()), "nll": float(nll.compute()),
            "ece": float(ece.compute())}


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of ``model`` over every labelled batch of ``loader`` (CPU, fp32)."""
    net = LogitsModel(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    try:
        for batch in loader:
            x, y = split_batch(batch)
            if y is None:
                raise ValueError("prediction metrics need labelled batches")
            logits.append(net(inputs_to(x, device)).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{"accuracy", "nll", "ece"}`` of precomputed logits (the metrics of :func:`evaluate`)."""
    c = logits.shape[-1]
    probs = logits.softmax(-1)
    return {
        "accuracy": float(MulticlassAccuracy(num_classes=c, average="micro")(probs, labels)),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": float(MulticlassCalibrationError(num_classes=c, n_bins=15, norm="l1")(probs,
                                                                                     labels)),
    }


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
