"""Putting packed layers into a model: building them, tying aliases, swapping them in.

A model's float layers become packed ones in two steps: the replacements are built first
(:func:`packed_replacements` from a result, :func:`modules_from_manifest` empty from a
manifest), so an error leaves the model unchanged; then :func:`install_packed` swaps them in and
hands the model's :class:`~bayesq_lightning.artifact.manifest.PackedLayers` to the install
listeners. :mod:`bayesq_lightning.hf` is one: it writes the ``quantization_config`` of every
transformers model inside, so ``save_pretrained`` works on any packed model
(``quantize_model``'s, ``load_quantized``'s, ``restore_quantized``'s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..attention import equivalent_layer, equivalents_holding, swap_equivalents
from ..layers import layer_kind
from ..result import LayerResult
from .manifest import ArtifactError, LayerEntry, PackedLayers, conv_options
from .modules import FLOAT_TYPES, QUANTIZED_TYPES, quantized_from_float
from .storage import DecodeBuffer, PackedLayer

InstallListener = Callable[[nn.Module, PackedLayers], None]
# Registered once, at ``import bayesq_lightning`` (hf.install); they hold no state of a run.
INSTALL_LISTENERS: list[InstallListener] = []


def on_install(listener: InstallListener) -> None:
    """Call ``listener(model, packed)`` after each :func:`install_packed` (once per listener)."""
    if listener not in INSTALL_LISTENERS:
        INSTALL_LISTENERS.append(listener)


def module_paths(model: nn.Module, module: nn.Module) -> list[str]:
    """Every dotted name under which ``module`` is registered in ``model``."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (not the root) by ``module``, under every
    name the old submodule is registered (``self.b = self.a`` makes ``a`` and ``b`` one layer)."""
    if not name:
        raise ValueError("cannot replace the root module in place; wrap it in a parent module")
    for n in module_paths(model, model.get_submodule(name)) or [name]:
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent), leaf, module)


def tie_packed(alias: PackedLayer, owner: PackedLayer) -> None:
    """Make ``alias`` decode ``owner``'s codes and metadata (the same tensors, stored once);
    the bias stays its own."""
    if alias.specs != owner.specs or alias.weight_shape != owner.weight_shape:
        raise ValueError("tied packed layers must have the same blocks and weight shape")
    for key, buf in owner.named_buffers(recurse=False):
        if key in alias._buffers:
            setattr(alias, key, buf)


def packed_alias(module: nn.Module, owner_layer: LayerResult, owner: PackedLayer,
                 name: str, cache: bool = False) -> PackedLayer:
    """The packed replacement of float layer ``module`` (at ``name``) that holds the weight of
    the layer ``owner_layer`` describes: ``owner``'s codes, its own bias and layer options (an
    output head tied to an embedding is a packed Linear decoding the embedding's codes)."""
    q = quantized_from_float(
        module, dataclasses.replace(owner_layer, name=name, kind=layer_kind(module)), cache)
    tie_packed(q, owner)
    return q


def packed_replacements(model: nn.Module, layers: Sequence[LayerResult], cache: bool = False,
                        tied: Mapping[str, str] | None = None,
                        bits_per_weight: float | None = None
                        ) -> tuple[dict[str, PackedLayer], PackedLayers]:
    """``{name: packed module}`` for the float layers ``layers`` and ``tied`` aliases of
    ``model`` (owners first, in order), and their record; ``model`` is not changed."""
    new = {}
    by_name = {x.name: x for x in layers}
    for name, owner in [*((x.name, None) for x in layers), *(tied or {}).items()]:
        try:
            module = equivalent_layer(model, name)
        except AttributeError as e:
            raise KeyError(f"model has no layer named {name!r}") from e
        if owner is None:
            new[name] = quantized_from_float(module, by_name[name], cache)
        elif owner not in new:
            raise KeyError(f"tied layer {name!r} names {owner!r}, which is not quantized")
        else:
            new[name] = packed_alias(module, by_name[owner], new[owner], name, cache)
    return new, PackedLayers.describe(new, [x.name for x in layers], tied, bits_per_weight)


def empty_module(skeleton: nn.Module, entry: LayerEntry, where: Path) -> PackedLayer:
    """An empty packed module for one manifest layer, checked against the skeleton's layer."""
    name, kind = entry.name, entry.kind
    fix = "build the skeleton with the configuration of the saved model"
    try:
        current = equivalent_layer(skeleton, name)
    except AttributeError as e:
        raise ArtifactError(f"layer {name!r} of {where} is not in the skeleton; {fix}") from e
    cls = QUANTIZED_TYPES.get(kind)
    if cls is None:
        raise ArtifactError(f"layer {name!r} of {where} has unknown kind {kind!r}; re-export")
    if not isinstance(current, (FLOAT_TYPES[kind], cls)):
        raise ArtifactError(
            f"layer {name!r} is {kind} in {where} but {type(current).__name__} in the "
            f"skeleton; {fix}"
        )
    shape = tuple(entry.weight_shape)
    have = tuple(current.weight_shape if isinstance(current, cls) else current.weight.shape)
    if have != shape:
        raise ArtifactError(
            f"layer {name!r} has weight shape {shape} in {where} but {have} in the skeleton; {fix}"
        )
    if (getattr(current, "bias", None) is not None) != entry.bias:
        raise ArtifactError(
            f"layer {name!r} {'has' if entry.bias else 'lacks'} a bias in {where} but not in "
            f"the skeleton; {fix}"
        )
    kwargs = {}
    if kind == "conv2d":
        if entry.conv is None:
            raise KeyError("conv")
        kwargs = entry.conv
        if conv_options(current) != kwargs:
            raise ArtifactError(
                f"conv layer {name!r} has options {kwargs} in {where} but "
                f"{conv_options(current)} in the skeleton; {fix}"
            )
    ref = next(current.parameters(), None)
    bias = getattr(current, "bias", None)
    try:
        module = cls(
            shape,
            entry.blocks,
            bias=bias is not None,
            dtype=bias.dtype if bias is not None else torch.float32,
            device=ref.device if ref is not None else None,
            **kwargs,
        )
    except (ValueError, NotImplementedError) as e:
        raise ArtifactError(f"layer {name!r} of {where}: {e}; re-export") from e
    module.train(current.training)
    return module


def modules_from_manifest(skeleton: nn.Module, packed: PackedLayers, where: Path
                          ) -> dict[str, PackedLayer]:
    """Empty packed modules for the layers and tied aliases of ``packed`` (aliases sharing their
    owner's buffers), each checked against the skeleton (:func:`empty_module`)."""
    new = {entry.name: empty_module(skeleton, entry, where) for entry in packed.layers}
    for tie in packed.tied:
        entry = packed.alias_entry(tie)
        try:  # a head tied to an embedding: its own kind, the owner's blocks
            entry = dataclasses.replace(
                entry, kind=layer_kind(equivalent_layer(skeleton, tie.name)))
        except (AttributeError, TypeError):
            pass  # empty_module names what is wrong
        new[tie.name] = empty_module(skeleton, entry, where)
        tie_packed(new[tie.name], new[tie.owner])
    return new


def swap_in(model: nn.Module, modules: Mapping[str, PackedLayer]) -> None:
    """Put ``modules`` into ``model`` at their names, sharing one decode buffer.

    An ``nn.MultiheadAttention`` or transformers ``Conv1D`` holding one of the names is first
    swapped for its equivalent of Linear layers (:mod:`~bayesq_lightning.attention`), whose
    layers the names are.
    """
    swap_equivalents(model, equivalents_holding(model, list(modules)))
    buffer = DecodeBuffer()
    for name, module in modules.items():
        module.decode_buffer = buffer
        set_submodule(model, name, module)


def install_packed(model: nn.Module, modules: Mapping[str, PackedLayer],
                   packed: PackedLayers) -> None:
    """Swap ``modules`` into ``model`` (:func:`swap_in`) and tell the install listeners that
    ``model`` now holds the packed layers ``packed`` describes."""
    swap_in(model, modules)
    for listener in INSTALL_LISTENERS:
        listener(model, packed)


def replace_quantized_layers(
    model: nn.Module, layers: Sequence[LayerResult], cache: bool = False,
    tied: Mapping[str, str] | None = None, bits_per_weight: float | None = None,
) -> nn.Module:
    """Swap the named float layers of ``model`` for packed ones, in place.

    All replacements are built before the first swap, so an error leaves ``model`` unchanged.

    Parameters
    ----------
    model : nn.Module
        Holds the float ``nn.Linear`` / ``nn.Conv2d`` layers named in ``layers``.
    layers : sequence of LayerResult
        Names are dotted module names as in ``model.named_modules()``.
    cache : bool
        ``cache_dequantized`` of the new modules.
    tied : mapping, optional
        ``{alias: owner}``: float layers holding the weight of an owner in ``layers``; each gets
        a packed module that shares the owner's codes and keeps its own bias.
    bits_per_weight : float, optional
        The allocation's storage bits per weight, recorded in the model's
        :class:`~bayesq_lightning.artifact.manifest.PackedLayers` (e.g. transformers'
        ``quantization_config``).

    Returns
    -------
    nn.Module
        ``model`` itself.
    """
    install_packed(model, *packed_replacements(model, layers, cache, tied, bits_per_weight))
    return model
