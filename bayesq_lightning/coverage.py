"""How much of a model's matrix weights a run quantized, and the warning when too little.

*Matrix weights* are the weights of ``nn.Linear``, ``nn.Conv2d``, transformers' ``Conv1D``,
attention projections (``nn.MultiheadAttention``'s ``in_proj_weight`` or ``q/k/v_proj_weight``;
its ``out_proj`` is a Linear) and ``nn.Embedding`` layers, counted by element, each tensor once
however many modules hold it. Any other layer with a ``weight`` of two or more dimensions (a
``Conv1d``, ``Conv3d``, ``ConvTranspose2d``, ``Bilinear``, a layer of one's own) counts too: it is
what a user expects to be quantized. Position embeddings, class tokens and layer scales do not
(an ``Embedding`` whose name marks it as positional; the others are not a layer's ``weight``).

:func:`matrix_weights` takes the inventory before the run (an in-place run replaces the layers);
:func:`coverage` reads what the result actually quantized, so a layer type that another part
of the package learns to quantize counts as soon as it lands in the result's layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

MAX_LEFT_OUT = 0.10
"""Share of the matrix weights, embeddings aside, that may stay in floating point unwarned."""
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
POSITIONAL = ("position", "pos_emb", "pos_embed", "wpe")


@dataclass(frozen=True)
class MatrixLayer:
    """One module holding matrix weights: its name, type, children and element count."""

    name: str
    kind: str
    children: frozenset[str]
    elements: int
    embedding: bool


def _matrix_params(name: str, module: nn.Module) -> list:
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and any(
            p in name.rpartition(".")[2].lower() for p in POSITIONAL):
        return []  # a position embedding
    params = [getattr(module, n, None) for n in ATTENTION_WEIGHTS]
    weight = getattr(module, "weight", None)
    params.append(weight if isinstance(weight, nn.Parameter) and weight.dim() >= 2 else None)
    return [p for p in params if isinstance(p, nn.Parameter)]


def matrix_weights(model: nn.Module) -> list[MatrixLayer]:
    """Every module of ``model`` holding matrix weights (see the module), in module order."""
    seen: set[int] = set()
    layers = []
    for name, module in model.named_modules():
        params = [p for p in _matrix_params(name, module) if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            layers.append(MatrixLayer(
                name, type(module).__name__, frozenset(n for n, _ in module.named_children()),
                sum(p.numel() for p in params),
                isinstance(module, (nn.Embedding, nn.EmbeddingBag))))
    return layers


def _covered(layer: MatrixLayer, quantized: set[str]) -> bool:
    """The layer itself, or a part of it that is not one of its own child modules (e.g. an
    attention module's projections), is among the quantized names."""
    if layer.name in quantized:
        return True
    prefix = f"{layer.name}." if layer.name else ""
    return any(q.startswith(prefix) and q[len(prefix):].split(".")[0] not in layer.children
               for q in quantized)


def coverage(inventory: Iterable[MatrixLayer], quantized: Iterable[str],
             tied: Mapping[str, str] | None = None, warn: bool = True) -> dict:
    """The shares of matrix weights quantized, and one warning when too little is.

    Parameters
    ----------
    inventory : iterable of MatrixLayer
        :func:`matrix_weights` of the model before the run.
    quantized : iterable of str
        The names of the layers the result quantized (``result.layers``).
    tied : mapping, optional
        The result's tied aliases (``{alias: owner}``): quantized with their owner.
    warn : bool
        Warn when more than :data:`MAX_LEFT_OUT` of the matrix weights, embeddings aside, stay
        in floating point, naming the layer types left out and their shares.

    Returns
    -------
    dict
        ``matrix_weights`` and ``embedding_weights`` (element counts), ``quantized_share`` (of
        the matrix weights, embeddings aside), ``embedding_quantized_share`` (``None`` without
        embeddings) and ``left_out`` (``{layer type: share}``, embeddings aside).
    """
    names = set(quantized) | set(tied or {})
    inventory = list(inventory)
    total = {False: 0, True: 0}
    done = {False: 0, True: 0}
    left: dict[str, int] = {}
    for layer in inventory:
        total[layer.embedding] += layer.elements
        if _covered(layer, names):
            done[layer.embedding] += layer.elements
        elif not layer.embedding:
            left[layer.kind] = left.get(layer.kind, 0) + layer.elements
    matrix = total[False]
    shares = {k: v / matrix for k, v in sorted(left.items(), key=lambda kv: -kv[1])} if matrix else {}
    out = {"matrix_weights": matrix, "embedding_weights": total[True],
           "quantized_share": done[False] / matrix if matrix else 1.0,
           "embedding_quantized_share": done[True] / total[True] if total[True] else None,
           "left_out": shares}
    if warn and 1.0 - out["quantized_share"] > MAX_LEFT_OUT:
        kinds = ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items())
        warnings.warn(
            f"{100 * (1 - out['quantized_share']):.1f}% of the model's matrix weights "
            f"(embeddings aside) stay in floating point: {kinds} (unsupported layer types, "
            "excluded layers or weights tied to such; result.skipped gives each reason). The "
            "bits per weight count the quantized layers only.", RuntimeWarning, stacklevel=3)
    return out
