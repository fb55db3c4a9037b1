"""Which path a packed Linear layer multiplies by: the exact decode or a stock integer kernel.

Every packed layer starts on ``kernel="exact"`` (decode the stored weights, bit for bit).
:func:`set_kernel` switches a model's packed Linear layers to ``"auto"``: each is repacked once
into a stock kernel's layout (:mod:`~bayesq_lightning.artifact.kernels`), kept beside its
buffers (never in the state dict), and :func:`fast_linear` uses it for inputs with few rows.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import kernels
from .storage import PackedLayer

KERNELS = ("exact", "auto")


def fast_weight(layer: PackedLayer) -> tuple[kernels.FastWeight | None, str]:
    """A packed Linear layer in a stock kernel's layout (prepared once), or ``(None, why not)``."""
    if layer._fast_why is None:
        layer._fast, layer._fast_why = kernels.prepare(
            layer.blocks(), layer.weight_shape, layer.block0_codes.device)
    return layer._fast, layer._fast_why


def fast_linear(layer: PackedLayer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` through a stock kernel, or ``None`` where the exact path must run.

    The kernel serves a layer on ``kernel="auto"`` that is not being tuned, for inputs of at
    most ``kernels.MAX_ROWS`` rows, and never where autograd needs a graph through ``x`` or the
    bias (grad mode on and either requires grad).
    """
    if layer.kernel != "auto" or layer.is_tuning:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (
            layer.bias is not None and layer.bias.requires_grad)):
        return None
    fast, _ = fast_weight(layer)
    if fast is None or kernels.rows_of(x) > kernels.MAX_ROWS[fast.kind]:
        return None
    return kernels.linear(x, fast, layer.bias)


def set_kernel(model: nn.Module, kernel: str = "auto") -> dict[str, str]:
    """Choose how the packed Linear layers of ``model`` multiply, in place.

    ``"auto"``: repack each layer once for stock PyTorch's CPU int4 / int8 weight-only kernels
    (:mod:`~bayesq_lightning.artifact.kernels`) and use them where they win, i.e. with few
    activation rows (bf16 activations: outputs within ``kernels.RTOL`` of the exact path);
    ``"exact"`` (the default of every packed layer): decode the stored weights, bit for bit.
    The artifact is unaffected either way.

    The kernel has no backward: it runs only where autograd needs no graph through the layer,
    i.e. under ``torch.no_grad()`` / ``torch.inference_mode()``, or anywhere once no parameter
    requires grad (``model.requires_grad_(False)``, which :func:`load_quantized` does);
    ``model.requires_grad_(True)`` brings the exact path back wherever grad mode is on.

    Returns
    -------
    dict
        ``{layer: path}`` for every packed layer: ``"int4"`` or ``"int8"`` (the kernel serves
        it, with at most ``kernels.MAX_ROWS`` rows) or ``"exact: <why>"``. One warning lists the
        Linear layers the kernel can never serve, and says when parameters requiring grad keep
        it off outside ``no_grad``.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
    paths: dict[str, str] = {}
    never: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PackedLayer):
            continue
        module.kernel = kernel
        if kernel == "exact":
            module.clear_cache()  # drops the repacked copy
            paths[name] = "exact: kernel='exact'"
        elif module.kind != "linear":
            paths[name] = f"exact: a {module.kind} layer (the kernels serve Linear layers)"
        else:
            fast, why = fast_weight(module)
            paths[name] = fast.kind if fast is not None else f"exact: {why}"
            if fast is None:
                never[name] = why
    notes = []
    if never:
        notes.append(f"{len(never)} packed Linear layer(s) keep the exact path: "
                     f"{dict(list(never.items())[:5])}")
    served = [n for n, p in paths.items() if not p.startswith("exact")]
    if served and any(p.requires_grad for p in model.parameters()):
        notes.append(f"{len(served)} layer(s) take the kernel only under torch.no_grad() or "
                     "torch.inference_mode() while parameters require grad; "
                     "model.requires_grad_(False) lets them take it everywhere")
    if notes:
        warnings.warn(f"kernel='auto': {'; '.join(notes)}", stacklevel=2)
    return paths
