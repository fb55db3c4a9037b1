"""Pictures of a run: the accuracy-vs-bits frontier, the per-layer allocation, reliability
diagrams (matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .result import QuantizationResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(rows: Sequence[Mapping], path: str | Path, highlight: str = "bayesq kron"
                  ) -> Path:
    """Accuracy against stored bits per weight, one line per method, one panel per ``case``.

    ``rows`` carry ``method``, ``bits_per_weight``, ``accuracy``, ``accuracy_se`` and optionally
    ``case``; a ``fp32`` row is drawn as a dotted reference line; rows marked ``fixed_width``
    (one width everywhere) as single markers.
    """
    plt = _pyplot()
    cases = list(dict.fromkeys(r.get("case", "") for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 4.5), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        sub = [r for r in rows if r.get("case", "") == case]
        for r in sub:
            if r["method"] == "fp32":
                ax.axhline(r["accuracy"], color="k", ls=":", lw=1, label="fp32")
        for method in dict.fromkeys(r["method"] for r in sub if r["method"] != "fp32"):
            mine = [r for r in sub if r["method"] == method]
            pts = sorted((r["bits_per_weight"], r["accuracy"], r.get("accuracy_se", 0.0))
                         for r in mine)
            x, y, e = zip(*pts, strict=True)
            style = (dict(marker="s", ls="none", ms=6) if mine[0].get("fixed_width") else
                     dict(marker="o", ms=3, lw=2.2 if method == highlight else 1))
            ax.errorbar(x, y, yerr=e, label=method, capsize=2, **style)
        ax.set_title(case)
        ax.set_xlabel("stored bits per weight (metadata included)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_allocation(results: Mapping[str, QuantizationResult], path: str | Path,
                    title: str = "") -> Path:
    """Bits per weight of every layer (metadata included), one bar group per method."""
    plt = _pyplot()
    first = next(iter(results.values()))
    names = [x.name for x in first.layers]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(names)), 3.4))
    width = 0.8 / len(results)
    for i, (method, res) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(names))],
               [x.bits_per_weight for x in res.layers], width, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30,
                  ha="right", fontsize=7)
    ax.set_ylabel("stored bits / weight")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reliability_bins(probs, labels, n_bins: int = 15) -> list[tuple[float, float, int]]:
    """``(mean confidence, accuracy, count)`` per non-empty equal-width confidence bin (ECE's)."""
    import torch

    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    idx = torch.bucketize(conf, edges[1:-1], right=False)  # bins (lo, hi], as torchmetrics
    out = []
    for b in range(n_bins):
        mask = idx == b
        if mask.any():
            out.append((float(conf[mask].mean()), float(correct[mask].mean()), int(mask.sum())))
    return out


def plot_reliability(panels: Mapping[str, Mapping[str, tuple]], path: str | Path,
                     n_bins: int = 15) -> Path:
    """Reliability diagrams: one panel per key of ``panels``, one line per model in it.

    ``panels[title][model] = (probs (N, C), labels (N,))``; the diagonal is perfect calibration.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (title, models) in zip(axes[0], panels.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="k", ls=":", lw=1)
        for name, (probs, labels) in models.items():
            bins = reliability_bins(probs, labels, n_bins)
            ax.plot([b[0] for b in bins], [b[1] for b in bins], marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
