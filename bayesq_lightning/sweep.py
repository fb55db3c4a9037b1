"""Budget sweeps: every method at every budget, scored on one test set with paired errors.

The demo and ``benchmarks/frontier.py`` both draw the accuracy-vs-bits frontier from here:
:func:`sweep` quantizes with each method at each budget (a method's posterior is fitted once and
reused across budgets), :func:`evaluate` evaluates a model keeping its per-example correctness, and
:func:`paired_differences` turns those into differences to FP32 and to a reference method at the
same budget, each with its paired bootstrap standard error (the same resampled examples for both
models of a pair).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from torch import nn

from .config import BayesQConfig
from .metrics import bootstrap_se, metrics_from_logits, predict
from .quantize import quantize_model
from .result import QuantizationResult


def evaluate(model: nn.Module, loader: Iterable) -> dict:
    """Accuracy, NLL, ECE, the accuracy's bootstrap SE and ``_correct`` (per example).

    Packed layers decode their weight once for the whole pass (``cache_dequantized``): the
    outputs are those of decoding per batch.
    """
    for m in model.modules():
        if hasattr(m, "cache_dequantized"):
            m.cache_dequantized = True
    logits, labels = predict(model, loader)
    correct = (logits.argmax(-1) == labels).double().numpy()
    return {**metrics_from_logits(logits, labels), "accuracy_se": bootstrap_se(correct),
            "_correct": correct}


def sweep(
    model: nn.Module,
    calibration_loader: Iterable,
    test_loader: Iterable,
    budgets: Sequence[float],
    methods: Mapping[str, Mapping],
    *,
    n_data: int,
    config: Mapping | None = None,
    log: Callable[[str], object] | None = None,
    on_result: Callable[[str, float, QuantizationResult, float], Iterable[dict]] | None = None,
) -> list[dict]:
    """The FP32 row, then one row per method and budget (call :func:`paired_differences` next).

    ``methods`` maps a row name to ``BayesQConfig`` fields, plus optionally
    ``curvature_loader`` (passed to :func:`~bayesq_lightning.quantize_model` for the fit);
    ``config`` holds fields shared by every method. ``prep_s`` is the quantization time at that
    budget with the (reused) posterior fit counted in full. ``on_result(name, bits, result,
    prep_s)``, called with each result once its row is measured, returns further rows (e.g.
    the result distilled), placed after it.
    """
    rows = [{"method": "fp32", "bits": 32.0, "bits_per_weight": 32.0,
             **evaluate(model, test_loader), "prep_s": 0.0}]
    for name, spec in methods.items():
        fields = dict(spec)
        curvature = fields.pop("curvature_loader", None)
        posterior = None
        for bits in budgets:
            t0 = time.perf_counter()
            res = quantize_model(
                model, calibration_loader, BayesQConfig(bits=bits, **(config or {}), **fields),
                n_data=n_data, progress=False, posterior=posterior,
                curvature_loader=curvature if posterior is None else None)
            prep = time.perf_counter() - t0
            if posterior is not None:
                prep += res.info.get("posterior_seconds", 0.0)  # the reused fit, counted in full
            posterior = res.posterior
            row = {"method": name, "bits": bits, "bits_per_weight": res.bits_per_weight,
                   **evaluate(res.model, test_loader), "prep_s": prep}
            rows.append(row)
            if log is not None:
                log(f"{name:>24} @ {bits:.3f}: acc {row['accuracy']:.4f} "
                    f"+- {row['accuracy_se']:.4f}, nll {row['nll']:.4f}, ece {row['ece']:.4f}, "
                    f"{row['bits_per_weight']:.3f} b/w, {prep:.1f} s")
            if on_result is not None:
                rows.extend(on_result(name, bits, res, prep))
    return rows


def paired_differences(rows: list[dict], reference: str = "gptq") -> list[dict]:
    """Add ``d_fp32`` and ``d_<reference>`` (with ``_se``) to ``rows`` and drop ``_correct``.

    A row is compared with the ``reference`` row of the same budget; rows marked
    ``fixed_width`` (one width everywhere, no budget) only with FP32.
    """
    fp32 = next(r for r in rows if r["method"] == "fp32")
    ref = {r["bits"]: r["_correct"] for r in rows if r["method"] == reference}
    base = fp32["_correct"]
    for r in rows:
        c = r["_correct"]
        r["d_fp32"] = r["accuracy"] - fp32["accuracy"]
        r["d_fp32_se"] = bootstrap_se(c - base)
        if r["method"] != "fp32" and not r.get("fixed_width") and r["bits"] in ref:
            r[f"d_{reference}"] = float((c - ref[r["bits"]]).mean())
            r[f"d_{reference}_se"] = bootstrap_se(c - ref[r["bits"]])
    for r in rows:
        del r["_correct"]
    return rows


def cheapest_bits(model: nn.Module, allowed_bits: Sequence[int] = (2, 3, 4, 8)) -> float:
    """Bits per weight of the cheapest allocation (every block at its narrowest width)."""
    # any budget that fits: only the cheapest allocation's cost is read
    res = quantize_model(model, None, BayesQConfig(bits=1e3, method="rtn",
                                                   allowed_bits=tuple(allowed_bits)),
                         progress=False)
    return res.info["min_bits_per_weight"]

