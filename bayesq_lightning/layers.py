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
KINDS = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}


def is_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` that can be quantized: a lookup of its rows (no ``max_norm``, which
    rewrites the weight in the forward pass)."""
    return isinstance(module, nn.Embedding) and module.max_norm is None


def layer_kind(module: nn.Module) -> str:
    """``"linear"``, ``"conv2d"`` or ``"embedding"``: the packed layer type of a float layer."""
    for cls, kind in KINDS.items():
        if isinstance(module, cls):
            return kind
    raise TypeError(f"{type(module).__name__} is not a quantizable layer type")


def _selectable(module: nn.Module, embeddings: bool) -> bool:
    return isinstance(module, QUANTIZABLE) or (embeddings and is_embedding(module))


def quantizable_layers(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
    embeddings: bool = False,
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` / ``nn.Conv2d`` (and ``nn.Embedding`` with
    ``embeddings``) selected by the name patterns."""
    chosen = []
    for name, module in model.named_modules():
        if not _selectable(module, embeddings):
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


def unsupported_layers(model: nn.Module, include: Sequence[str] | None = None,
                       exclude: Sequence[str] | None = None,
                       embeddings: bool = False) -> dict[str, str]:
    """``{name: reason}`` of the weight layers (a parameter of 2 or more dimensions) that are not
    ``nn.Linear`` / ``nn.Conv2d``, e.g. ``Embedding``, ``Conv1d``: left in floating point.

    Norm and bias vectors are not listed (nothing to quantize there). Name patterns apply as to
    the quantized layers. ``embeddings``: ``nn.Embedding`` layers are quantized, not listed.
    """
    out = {}
    for name, module in model.named_modules():
        if _selectable(module, embeddings) or not any(
                p.dim() >= 2 for p in module.parameters(recurse=False)):
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        out[name] = (f"{type(module).__name__} is not quantized (nn.Linear / nn.Conv2d only); "
                     "kept in floating point")
        if isinstance(module, nn.Embedding):
            out[name] = ("Embedding kept in floating point (quantize_embeddings=True quantizes "
                         "it)" if module.max_norm is None else
                         "Embedding with max_norm (it rewrites its weight when called) is not "
                         "quantized; kept in floating point")
    return out


def split_tied(model: nn.Module, named: Sequence[tuple[str, nn.Module]]
               ) -> tuple[list[tuple[str, nn.Module]], dict[str, str], dict[str, str]]:
    """Selected layers with one weight each, ``{alias: owner}`` and ``{skipped: reason}``.

    A weight held by several selected layers (``b.weight = a.weight``) is quantized once: the
    first holder in module order owns it and the others become aliases that share its packed
    codes (their biases stay their own). A weight also held by a module that is not quantized
    (tied input/output embeddings, an excluded layer) is left in floating point, listed in
    ``skipped``: quantizing one holder would break the tie and store the weight twice. A module
    registered under several names is one layer (``named_modules`` lists it once).
    """
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append((name, module))
    chosen = {id(m) for _, m in named}
    kept, aliases, skipped = [], {}, {}
    for name, module in named:
        group = holders[id(module.weight)]
        outside = [(n, m) for n, m in group if id(m) not in chosen]
        if outside:
            n, m = outside[0]
            skipped[name] = (f"weight tied to {n!r} ({type(m).__name__}), which is not "
                             "quantized; kept in floating point so the tie holds")
        elif group[0][1] is not module:
            aliases[name] = group[0][0]
        else:
            kept.append((name, module))
    if not kept:
        raise ValueError(f"every selected layer's weight is tied to a module that stays in "
                         f"floating point ({skipped}); select other layers with include=[...]")
    return kept, aliases, skipped


def untie_parameters(model: nn.Module) -> None:
    """Give every module its own copy of a parameter it shares with an earlier module.

    For a throwaway copy only (the posterior fit's): laplace-torch's backends need each
    parameter to belong to one module.
    """
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if id(p) in seen:
                setattr(module, pname, nn.Parameter(p.detach().clone(),
                                                    requires_grad=p.requires_grad))
            else:
                seen.add(id(p))


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
                                 f"correct the pattern (fnmatch syntax, e.g. 'encoder.*') or "
                                 f"drop it. Quantized layers: {list(pins)}")
    return pins
