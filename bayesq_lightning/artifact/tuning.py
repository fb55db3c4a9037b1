"""Tuning a packed layer's quantizer parameters with its integer codes frozen (distillation).

:func:`start_tuning` gives the layer an fp32 master ``block<i>_<name>_master`` (an
``nn.Parameter``) per block and per tuned metadata name, and the codes unpacked once as the
non-persistent buffer ``block<i>_unpacked``. While tuning, the layer decodes with
:func:`tuned_weight`: the masters rounded to fp16 in the forward pass, the gradient straight
through to the masters, so the model trained and evaluated is the one :func:`finish_tuning`
stores (the masters rounded to fp16 into the packed buffers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..quantizers import dequantize
from ..result import BlockResult

if TYPE_CHECKING:
    from .storage import PackedLayer


def start_tuning(layer: PackedLayer, meta: Sequence[str]) -> list[nn.Parameter]:
    """Make the named quantizer parameters of ``layer`` trainable; the codes stay frozen.

    Parameters
    ----------
    layer : PackedLayer
        A packed layer not being tuned.
    meta : sequence of str
        Among ``"scale"``, ``"zero"``, ``"codebook"``; a block gets a master for each of its
        metadata tensors named here.

    Returns
    -------
    list of nn.Parameter
        The new masters (empty when no block has any of ``meta``).
    """
    if layer.is_tuning:
        raise RuntimeError("this layer is already being tuned; call finish_tuning() first")
    masters = []
    for i, (s, b) in enumerate(zip(layer.specs, layer.blocks(), strict=True)):
        for name in s.meta_shapes:
            if name in meta:
                p = nn.Parameter(getattr(layer, f"block{i}_{name}").detach().float().clone())
                layer.register_parameter(f"block{i}_{name}_master", p)
                masters.append(p)
        # a buffer so that .to(device) moves it
        layer.register_buffer(f"block{i}_unpacked", b.codes, persistent=False)
    layer.is_tuning = True
    layer.clear_cache()
    return masters


def tuned_weight(layer: PackedLayer, dtype: torch.dtype) -> torch.Tensor:
    """The weight of a layer being tuned, decoded with its masters rounded to fp16."""
    parts = []
    for i, s in enumerate(layer.specs):
        meta = {}
        for name in s.meta_shapes:
            m = getattr(layer, f"block{i}_{name}_master", None)
            # the fp16 value in the forward, the gradient straight through to the master
            meta[name] = (getattr(layer, f"block{i}_{name}") if m is None
                          else m + (m.half().float() - m).detach())
        block = BlockResult(rows=s.rows, bits=s.bits, quantizer=s.quantizer,
                            group_size=s.group_size, codes=getattr(layer, f"block{i}_unpacked"),
                            **meta)
        parts.append(dequantize(block, dtype))
    return torch.cat(parts, dim=0).reshape(layer.weight_shape)


def finish_tuning(layer: PackedLayer) -> None:
    """Round the masters to fp16 into the buffers and drop them; the layer is packed again."""
    if not layer.is_tuning:
        return
    with torch.no_grad():
        for i, s in enumerate(layer.specs):
            for name in s.meta_shapes:
                key = f"block{i}_{name}_master"
                m = getattr(layer, key, None)
                if m is not None:
                    getattr(layer, f"block{i}_{name}").copy_(m.detach().half())
                    delattr(layer, key)
            delattr(layer, f"block{i}_unpacked")
    layer.is_tuning = False
    layer.clear_cache()
