"""Which layers are quantized: selection by name patterns, finiteness, per-layer bit pins."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import BayesQConfig

QUANTIZABLE = (nn.Linear, nn.Conv2d)


def quantizable_layers(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` / ``nn.Conv2d`` selected by the name patterns."""
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZABLE):
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        chosen.append((name, module))
    if not chosen:
        kinds = sorted({type(m).__name__ for m in model.modules() if list(m.parameters(False))})
        raise ValueError(
            "the model has no quantizable layer (nn.Linear / nn.Conv2d) selected by "
            f"include={include!r}, exclude={exclude!r}; parameterised layer types found: {kinds}. "
            "Check the patterns or quantize a model built from Linear/Conv2d layers."
        )
    return chosen


def check_finite(layers: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse NaN/inf weights before any work: they would poison scales and curvature."""
    for name, module in layers:
        w = module.weight
        if not torch.isfinite(w).all():
            n_bad = int((~torch.isfinite(w)).sum())
            raise ValueError(
                f"layer {name!r} has {n_bad} NaN/inf weight(s); fix training (lower the learning "
                "rate, clip gradients) or exclude the layer with exclude=[...]"
            )


def pinned_bits(name: str, cfg: BayesQConfig) -> tuple[int, ...]:
    """``allowed_bits`` restricted by every matching ``min_bits`` / ``max_bits`` pattern."""
    lo = max([b for p, b in (cfg.min_bits or {}).items() if fnmatch.fnmatchcase(name, p)],
             default=0)
    hi = min([b for p, b in (cfg.max_bits or {}).items() if fnmatch.fnmatchcase(name, p)],
             default=99)
    bits = tuple(b for b in cfg.allowed_bits if lo <= b <= hi)
    if not bits:
        raise ValueError(
            f"layer {name!r}: allowed_bits={cfg.allowed_bits} has no width within its pins "
            f"[{lo}, {hi}]; add a width in that range to allowed_bits or relax min_bits/max_bits"
        )
    return bits


def check_pin_patterns(layer_names: Sequence[str], cfg: BayesQConfig) -> dict[str, tuple[int, ...]]:
    """Every layer's pinned widths; a ``min_bits``/``max_bits`` pattern matching none is an error."""
    pins = {name: pinned_bits(name, cfg) for name in layer_names}
    for field in ("min_bits", "max_bits"):
        for pattern in getattr(cfg, field) or {}:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in pins):
                raise ValueError(f"{field} pattern {pattern!r} matches no quantized layer; "
                                 f"layers: {list(pins)}")
    return pins
