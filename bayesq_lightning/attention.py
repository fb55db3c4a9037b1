r"""Layers whose weights are not called as ``nn.Linear`` modules, made into ones that are.

Quantization reads each layer's inputs through module hooks (GPTQ's ``X X^T``, the curvature
backends' K-FAC and GGN) and packs ``nn.Linear`` modules. Two common layers hide their matrix
weights from both:

* ``nn.MultiheadAttention`` keeps q, k and v in the bare parameter ``in_proj_weight`` (or
  ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``) and uses ``out_proj``'s
  weight functionally; in eval mode under ``no_grad`` it may take
  ``torch._native_multi_head_attention``, which runs no hook at all.
  :class:`LinearMultiheadAttention` computes the same function with four ``nn.Linear`` layers
  ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` that it calls as modules (the weights are
  views of the original ones: no copy).
* transformers' ``Conv1D`` (the GPT-2 family) is a Linear layer with its weight stored
  ``(in, out)``; its equivalent is an ``nn.Linear`` holding the transposed weight.

:func:`linear_equivalent` gives a copy of a model (sharing its weights' storage) with every such
layer swapped for its equivalent, on which the whole pipeline runs; :func:`swap_equivalents`
does the same swap in place (``inplace=True`` packs into the caller's model). A packed model
holds the attention module of Linear layers (its packed ``q_proj``... run on every path); a
packed ``Conv1D`` is a ``QuantizedLinear`` at the same name.

A selected layer whose forward never runs on the calibration batches (a weight used
functionally, e.g. torchvision's Swin calls ``F.linear(x, self.qkv.weight)``) has no input
statistics: :func:`uncalled_layers` finds it by one hooked forward pass, and the pipeline lists it
in ``result.skipped`` with that reason.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .batches import batch_inputs, clone_module, forward_checked, fp32_logits_copy


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class if transformers is loaded (else no model can hold one)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """``module`` is a transformers ``Conv1D`` (a Linear layer with its weight ``(in, out)``)."""
    cls = conv1d_type()
    return cls is not None and isinstance(module, cls)


def linear_from_conv1d(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what a transformers ``Conv1D`` does (weight transposed into a
    contiguous copy; the bias shared)."""
    w = module.weight
    lin = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if module.bias is not None:
        lin.bias = module.bias
    lin.train(module.training)
    return lin


def _linear_view(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` whose parameters are new leaves over the storage of ``weight``/``bias``."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return lin


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (``True``: not attended) as an additive float mask; a float one as is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)


class LinearMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` computed with four ``nn.Linear`` modules it calls.

    Same arguments, outputs and parameters (as views, no copy) as the module it is built from;
    ``q_proj``, ``k_proj`` and ``v_proj`` are the rows of ``in_proj_weight`` (or the separate
    ``q/k/v_proj_weight``), ``out_proj`` the output projection. It never takes the native fast
    path (which bypasses module hooks and packed layers); outputs agree with the original's to
    float rounding.

    Parameters
    ----------
    mha : nn.MultiheadAttention
        The module to mirror.
    """

    # read by nn.TransformerEncoderLayer's fast-path checks: they see a module the fused kernel
    # cannot run, and take the path that calls this one
    _qkv_same_embed_dim = False
    in_proj_bias = None

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e = mha.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self.add_zero_attn = mha.add_zero_attn
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight
            ws = (w[:e], w[e:2 * e], w[2 * e:])
        else:
            ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        b = mha.in_proj_bias
        bs = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        self.q_proj, self.k_proj, self.v_proj = (_linear_view(w, bb) for w, bb in zip(ws, bs, strict=True))
        self.out_proj = _linear_view(mha.out_proj.weight, mha.out_proj.bias)
        self.bias_k, self.bias_v = mha.bias_k, mha.bias_v
        self.train(mha.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # work sequence-first, (L, N, E), as the reference does
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint; pass the causal "
                               "mask as attn_mask (as nn.MultiheadAttention requires)")
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        out, weights = self._attend(q, k, v, key_padding_mask, attn_mask, need_weights,
                                    is_causal)
        out = self.out_proj(out)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                attn_mask: Tensor | None, need_weights: bool, is_causal: bool
                ) -> tuple[Tensor, Tensor | None]:
        """Scaled dot-product attention of projected ``(L, N, E)`` inputs: the heads' outputs
        ``(L, N, E)`` and, with ``need_weights``, the weights ``(N, heads, L, S)``."""
        tgt, n, _ = q.shape
        h, d = self.num_heads, self.head_dim
        use_causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if use_causal else _float_mask(attn_mask, q.dtype)
        pad = _float_mask(key_padding_mask, q.dtype)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, n, -1)])
            v = torch.cat([v, self.bias_v.expand(1, n, -1)])
            mask = None if mask is None else F.pad(mask, (0, 1))
            pad = None if pad is None else F.pad(pad, (0, 1))
        q = q.reshape(tgt, n * h, d).transpose(0, 1)  # (N*H, L, d)
        k = k.reshape(k.shape[0], n * h, d).transpose(0, 1)
        v = v.reshape(v.shape[0], n * h, d).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n * h, 1, d)], dim=1)
            v = torch.cat([v, v.new_zeros(n * h, 1, d)], dim=1)
            mask = None if mask is None else F.pad(mask, (0, 1))
            pad = None if pad is None else F.pad(pad, (0, 1))
        src = k.shape[1]
        if mask is not None:
            mask = mask.reshape(-1, tgt, src).expand(n * h, tgt, src).reshape(n, h, tgt, src)
        if pad is not None:
            pad = pad.reshape(n, 1, 1, src)
            mask = pad if mask is None else mask + pad
        q, k, v = (x.reshape(n, h, -1, d) for x in (q, k, v))
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * d ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = (F.dropout(weights, p) if p > 0 else weights) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, mask, p, is_causal=use_causal)
        return out.permute(2, 0, 1, 3).reshape(tgt, n, h * d), weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}")


class _LinearCalls(TorchFunctionMode):
    """Runs ``F.linear(x, layer.weight, b)`` as a call of ``layer`` (its hooks fire), for the
    layers given; the bias passed is honoured (Swin V2 zeroes the key bias of a copy)."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.layers = {id(layer.weight): layer for layer in layers}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x, weight, bias = (*args, *[kwargs.get(k) for k in ("weight", "bias")][len(args) - 1:])
        layer = self.layers.get(id(weight))
        if layer is None:
            return func(*args, **kwargs)
        y = layer(x)
        if bias is not layer.bias:
            y = y - layer.bias if layer.bias is not None else y
            y = y + bias if bias is not None else y
        return y


def _enter_linear_calls(module: nn.Module, args) -> None:
    mode = _LinearCalls([m for m in module.children() if type(m) is nn.Linear])
    module.__dict__.setdefault("_bayesq_linear_calls", []).append(mode)
    mode.__enter__()


def _exit_linear_calls(module: nn.Module, args, output) -> None:
    stack = module.__dict__.get("_bayesq_linear_calls")
    if stack:
        stack.pop().__exit__(None, None, None)


def functional_linear_users(model: nn.Module) -> list[str]:
    """The modules of ``model`` known to pass their Linear children's weights to ``F.linear``
    (torchvision's Swin attention) instead of calling them."""
    return [n for n, m in model.named_modules()
            if type(m).__name__ in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")
            and type(m).__module__.startswith("torchvision.")]


def call_linears(model: nn.Module) -> None:
    """Make the modules of :func:`functional_linear_users` call their Linear children, in place:
    hooks that run each ``F.linear(x, child.weight, ...)`` of their forward as ``child(x)``
    (same output; module hooks, input statistics and curvature backends then see the call)."""
    for name in functional_linear_users(model):
        module = model.get_submodule(name)
        module.register_forward_pre_hook(_enter_linear_calls)
        module.register_forward_hook(_exit_linear_calls, always_call=True)


def _equivalent(module: nn.Module) -> nn.Module | None:
    """The Linear-calling equivalent of ``module``, or ``None`` if it needs none."""
    if isinstance(module, nn.MultiheadAttention):
        return LinearMultiheadAttention(module)
    if is_conv1d(module):
        return linear_from_conv1d(module)
    return None


def swap_equivalents(model: nn.Module, only: Sequence[str] | None = None) -> list[str]:
    """Swap every ``nn.MultiheadAttention`` and transformers ``Conv1D`` of ``model`` (those named
    in ``only``, if given) for its Linear-calling equivalent, in place; returns their names.

    A ``nn.TransformerEncoder`` holding a swapped layer stops converting padded batches to
    nested tensors (a fast path of the fused kernel only): its outputs at padded positions are
    then computed like every other position instead of being set to zero.
    """
    swapped, made = [], {}  # a module registered under several names: one equivalent
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or (only is not None and id(module) not in made
                        and name not in only):
            continue
        new = made.get(id(module)) or _equivalent(module)
        if new is None:
            continue
        made[id(module)] = new
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, new)
        swapped.append(name)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(m, LinearMultiheadAttention) for m in module.modules()):
            module.use_nested_tensor = False
    return swapped


def equivalents_holding(model: nn.Module, layer_names: Sequence[str]) -> list[str]:
    """The layers of ``model`` to swap (:func:`swap_equivalents`) so that every name of
    ``layer_names`` (names in the swapped model) is an ``nn.Linear`` there: the attention
    modules and ``Conv1D`` layers holding one of them."""
    return [name for name, module in model.named_modules() if name and _equivalent_kind(module)
            and any(n == name or n.startswith(name + ".") for n in layer_names)]


def swapped_weights(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """The matrix weights of the layers ``names`` of ``model`` that :func:`swap_equivalents`
    replaces (``in_proj_weight``, ``q/k/v_proj_weight``, ``out_proj.weight``, a ``Conv1D``'s)."""
    return [p for n in names for p in model.get_submodule(n).parameters() if p.dim() == 2]


def equivalent_layer(model: nn.Module, name: str) -> nn.Module:
    """The module at ``name`` as the pipeline names it: inside (or at) an attention module or a
    ``Conv1D`` of ``model``, that layer of its equivalent (built over the same weights, ``model``
    unchanged); elsewhere ``model.get_submodule(name)`` (``AttributeError`` if missing)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            holder = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        if _equivalent_kind(holder):
            return _equivalent(holder).get_submodule(".".join(parts[i:]))
    return model.get_submodule(name)


def own_unpacked_weights(model: nn.Module, swapped: Sequence[str], packed: set[str]) -> None:
    """Give each Linear inside the swapped layers ``swapped`` of ``model`` that is not among
    ``packed`` its own copy of its weight (a copy of a model must not share a weight it keeps
    with the original)."""
    for name in swapped:
        module = model.get_submodule(name)
        for sub, lin in module.named_modules(prefix=name):
            if isinstance(lin, nn.Linear) and sub not in packed:
                lin.weight = nn.Parameter(lin.weight.detach().clone(),
                                          requires_grad=lin.weight.requires_grad)


def needs_equivalents(model: nn.Module) -> bool:
    """``model`` holds a layer :func:`swap_equivalents` would swap."""
    return any(_equivalent_kind(m) for m in model.modules())


def _equivalent_kind(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or is_conv1d(module)


def linear_equivalent(model: nn.Module) -> nn.Module:
    """``model`` itself if it holds no layer to swap, else a copy (sharing every parameter's
    storage, buffers copied) with each swapped for its equivalent (:func:`swap_equivalents`)
    and Swin's attention calling its Linear layers (:func:`call_linears`)."""
    if not needs_equivalents(model) and not functional_linear_users(model):
        return model
    work = clone_module(model, model.parameters())
    swap_equivalents(work)
    call_linears(work)
    return work


@torch.no_grad()
def uncalled_layers(model: nn.Module, batch, names: Sequence[str]) -> list[str]:
    """The layers among ``names`` whose forward does not run when ``model`` sees ``batch``
    (one forward pass of an fp32 copy sharing the weights)."""
    net, device, modules = fp32_logits_copy(model, share_weights=True)
    called: set[str] = set()
    hooks = [modules[n].register_forward_pre_hook(lambda *_, n=n: called.add(n)) for n in names]
    try:
        forward_checked(net, batch_inputs([batch], device)[0], 0)
    finally:
        for hook in hooks:
            hook.remove()
    return [n for n in names if n not in called]


UNCALLED_REASON = ("its forward never ran on the calibration batches (its weight is used "
                   "functionally, e.g. F.linear(x, layer.weight), or the layer is unused); "
                   "kept in floating point")
