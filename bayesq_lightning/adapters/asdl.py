r"""ASDL's private API: its convolution operation, made exact for grouped convolutions.

Written against asdfghjkl 0.1a4 (the ASDL laplace-torch 0.3 pins). laplace-torch's ``AsdlGGN``
computes the GGN diagonal of an ``nn.Conv2d`` with ASDL's ``operations.conv.Conv2d``, whose
three static methods below (:data:`REPLACED`) ignore a convolution's ``groups``:

* ``cov_diag_weight`` has two branches. Where ``L (out + in k k) < out in k k`` (``L`` output
  positions) it takes :math:`\sum_{n,t} g_{nt}^2 x_{nt}^2`, which drops the cross terms of
  positions and, for ``groups > 1``, fails on a shape; otherwise it squares
  ``batch_grads_weight``.
* ``batch_grads_weight`` multiplies every output channel's gradient with the patches of *all*
  input channels and reshapes the result to the weight's shape: for ``groups > 1`` a wrong
  per-sample gradient, with no error.
* ``preprocess_in_data`` (``im2col_2d``) refuses a dilation, reads a string ``padding`` as
  numbers and pads with zeros whatever the ``padding_mode``.

:func:`exact_grouped_convs` swaps in the exact versions while a fit runs: the patches of
:func:`~bayesq_lightning.input_stats.conv_unfold` (the layer's own padding and dilation), the
per-sample gradient of each group from its own channels' patches, and the diagonal as the sum
of its squares over the samples (chunked, so that no more than :data:`CHUNK_ELEMENTS` gradient
entries exist at once). A convolution with ``groups == 1`` keeps ASDL's own diagonal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from asdl.operations.conv import Conv2d as AsdlConv2d
from torch import Tensor, nn

from ..input_stats import conv_unfold

PACKAGE, VERSION = "asdfghjkl", "0.1a4"
REPLACED = (("preprocess_in_data", ("module", "in_data", "out_data")),
            ("batch_grads_weight", ("module", "in_data", "out_grads")),
            ("cov_diag_weight", ("module", "in_data", "out_grads")))
"""Static methods of ``asdl.operations.conv.Conv2d`` replaced here, with their parameters."""

CHUNK_ELEMENTS = 1 << 23
"""Per-sample gradient entries formed at once by the grouped diagonal (32 MB of fp32)."""


def _patches(module: nn.Module, in_data: Tensor, out_data: Tensor) -> Tensor:
    return conv_unfold(module, in_data)  # (n, in k k, L)


def _grouped_grads(module: nn.Module, in_data: Tensor, out_grads: Tensor) -> Tensor:
    """Per-sample weight gradients ``(n, out, in / groups, kh, kw)``, each group from its own
    input channels' patches."""
    n, g, L = in_data.shape[0], module.groups, in_data.shape[-1]
    x = in_data.reshape(n, g, -1, L)             # (n, g, cols, L)
    dy = out_grads.reshape(n, g, -1, L)          # (n, g, out / g, L)
    return torch.einsum("ngol,ngcl->ngoc", dy, x).reshape(n, *module.weight.shape)


def _batch_grads(module: nn.Module, in_data: Tensor, out_grads: Tensor) -> Tensor:
    if module.groups == 1:
        return _ORIGINAL["batch_grads_weight"](module, in_data, out_grads)
    return _grouped_grads(module, in_data, out_grads)


def _cov_diag(module: nn.Module, in_data: Tensor, out_grads: Tensor) -> Tensor:
    if module.groups == 1:
        return _ORIGINAL["cov_diag_weight"](module, in_data, out_grads)
    step = max(1, CHUNK_ELEMENTS // module.weight.numel())
    diag = torch.zeros_like(module.weight, dtype=out_grads.dtype)
    for i in range(0, in_data.shape[0], step):
        diag += _grouped_grads(module, in_data[i:i + step], out_grads[i:i + step]).square().sum(0)
    return diag


_ORIGINAL = {name: getattr(AsdlConv2d, name) for name, _ in REPLACED}
_EXACT = {"preprocess_in_data": _patches, "batch_grads_weight": _batch_grads,
          "cov_diag_weight": _cov_diag}


@contextmanager
def exact_grouped_convs() -> Iterator[None]:
    """ASDL's ``Conv2d`` operation with the exact grouped diagonal (see the module) inside the
    block; ASDL's own methods are back on exit, also when the block raises."""
    try:
        for name, fn in _EXACT.items():
            setattr(AsdlConv2d, name, staticmethod(fn))
        yield
    finally:
        for name, fn in _ORIGINAL.items():
            setattr(AsdlConv2d, name, staticmethod(fn))
