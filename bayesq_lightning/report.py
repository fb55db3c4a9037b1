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


def allocation_geometry(result: QuantizationResult) -> tuple[list[float], list[float], float]:
    """Where :func:`plot_allocation` draws ``result``'s layers: each one's left edge and width
    on ``[0, 1]`` (its share of the quantized weights, in layer order), and the budget in bits
    per weight."""
    sizes = [x.n_weights for x in result.layers]
    total = float(sum(sizes))
    starts = [sum(sizes[:i]) / total for i in range(len(sizes))]
    return starts, [n / total for n in sizes], result.budget_bits / max(result.n_weights, 1)


def plot_allocation(results: Mapping[str, QuantizationResult], path: str | Path,
                    title: str = "") -> Path:
    """Bits per weight of every layer (metadata included), each layer as wide as its share of
    the quantized weights, the budget as a dashed line; one panel per method, on one x axis.

    ``results`` maps a method's name to its result (BayesQ first, then the baselines); the
    layers and the budget are the first result's.
    """
    plt = _pyplot()
    first = next(iter(results.values()))
    starts, widths, budget = allocation_geometry(first)
    top = max(x.bits_per_weight for r in results.values() for x in r.layers)
    fig, axes = plt.subplots(len(results), 1, figsize=(8.0, 1.1 + 1.9 * len(results)),
                             sharex=True, squeeze=False)
    for ax, (method, res) in zip(axes[:, 0], results.items(), strict=True):
        bits = {x.name: x.bits_per_weight for x in res.layers}
        ax.bar(starts, [bits.get(x.name, float("nan")) for x in first.layers], widths,
               align="edge", edgecolor="white", linewidth=0.6, color="#9ecae1")
        ax.axhline(budget, color="k", ls="--", lw=1)
        ax.set_ylim(0, top * 1.08)
        ax.set_ylabel("bits / weight", fontsize=8)
        ax.set_title(f"{method}: {res.bits_per_weight:.3f} bits/weight "
                     f"(budget {budget:.3g}, dashed)", fontsize=9, loc="left")
        for s, w, x in zip(starts, widths, first.layers, strict=True):
            if w >= 0.04:  # names of layers too narrow to hold one would overlap
                ax.text(s + w / 2, 0.04, x.name, transform=ax.get_xaxis_transform(),
                        rotation=90, ha="center", va="bottom", fontsize=7)
    axes[-1, 0].set_xlim(0, 1)
    axes[-1, 0].set_xlabel("share of the quantized weights (each layer as wide as its weights)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary(report: Mapping, paths: Mapping[str, object] = ()) -> str:
    """The table printed at the end of a command: accuracy, NLL, ECE and bits per weight of
    FP32, the quantized model, each baseline and the distilled model (those in ``report``), then
    one line per entry of ``paths`` (``{"checkpoint": ..., "artifact": ..., "report": ...}``)."""
    bits = report.get("bits_per_weight")
    rows = [("fp32", report.get("fp32"), 32.0 if "fp32" in report else None),
            ("quantized", report.get("quantized"), bits)]
    base_bits = report.get("baseline_bits_per_weight", {})
    rows += [(m, v, base_bits.get(m)) for m, v in report.get("baselines", {}).items()]
    rows.append(("distilled", report.get("distilled"), bits))
    lines = [f"{'model':<12}{'accuracy':>10}{'NLL':>10}{'ECE':>10}{'bits/weight':>13}"]
    for name, metrics, b in rows:
        if metrics is None and (name == "distilled" or b is None):
            continue
        cells = [f"{metrics[k]:>10.4f}" if metrics else f"{'-':>10}"
                 for k in ("accuracy", "nll", "ece")]
        lines.append(f"{name:<12}{''.join(cells)}{'' if b is None else f'{b:>13.3f}'}")
    width = max(len(k) for k in paths) if paths else 0
    lines += [f"{k + ':':<{width + 2}}{v}" for k, v in dict(paths).items() if v is not None]
    return "\n".join(lines)


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
