"""Layers that hold packed integer weights and dequantize them in ``forward``.

A :class:`QuantizedLinear` / :class:`QuantizedConv2d` keeps, per block (a slice of output
channels), one packed ``uint8`` code buffer and the block's fp16 quantizer parameters as
buffers, so ``state_dict()`` is the artifact's content:

``<layer>.block<i>_codes``
    packed codes (:func:`bayesq_lightning.artifact.packing.pack_codes`), ``ceil(n * bits / 8)`` bytes;
``<layer>.block<i>_scale``, ``<layer>.block<i>_zero``
    fp16 ``(rows, n_groups)``, uniform blocks;
``<layer>.block<i>_codebook``
    fp16 ``(2**bits,)`` or ``(rows, 2**bits)``, non-uniform blocks;
``<layer>.bias``
    the float module's bias, unchanged.

Each block's layout (row range, bits, quantizer, group size, tensor shapes) is a
:class:`BlockSpec`, plain data kept on the module and written to the manifest, so a module can be
rebuilt empty from it and filled by ``load_state_dict``. The weights are decoded by
:func:`bayesq_lightning.quantizers.dequantize`, the package's single decoder, so a packed layer
computes exactly what a float layer holding the dequantized weights computes.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import check_bits, dequantize
from ..result import BlockResult, LayerResult
from . import kernels
from .packing import pack_codes, packed_nbytes, unpack_codes

_META = {"uniform": ("scale", "zero"), "nonuniform": ("codebook",)}


@dataclass
class BlockSpec:
    """Layout of one packed block: everything except the tensor values.

    Attributes
    ----------
    rows : tuple[int, int]
        ``(start, stop)`` output-channel range.
    bits : int
        Bits per code.
    quantizer : str
        ``"uniform"`` or ``"nonuniform"``.
    group_size : int or None
        Input columns per scale/zero; ``None`` for one per row.
    cols : int
        Codes per row, ``prod(weight_shape[1:])``.
    meta_shapes : dict[str, tuple[int, ...]]
        Shape of each fp16 metadata tensor: ``scale`` and ``zero``, or ``codebook``.
    """

    rows: tuple[int, int]
    bits: int
    quantizer: str
    group_size: int | None
    cols: int
    meta_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def n_weights(self) -> int:
        return self.n_rows * self.cols

    @property
    def code_bytes(self) -> int:
        return packed_nbytes(self.n_weights, self.bits)

    @property
    def meta_bytes(self) -> int:
        return 2 * sum(math.prod(s) for s in self.meta_shapes.values())


def block_spec(block: BlockResult) -> BlockSpec:
    """The :class:`BlockSpec` of a :class:`~bayesq_lightning.result.BlockResult`."""
    if block.quantizer not in _META:
        raise ValueError(
            f"unknown quantizer {block.quantizer!r}; expected 'uniform' or 'nonuniform'"
        )
    meta = {}
    for name in _META[block.quantizer]:
        t = getattr(block, name)
        if t is None:
            raise ValueError(f"a {block.quantizer} block needs {name}, but it is None")
        meta[name] = tuple(t.shape)
    if block.codes.dim() != 2:
        raise ValueError(f"block codes must be (rows, cols), got shape {tuple(block.codes.shape)}")
    return BlockSpec(
        rows=(int(block.rows[0]), int(block.rows[1])),
        bits=int(block.bits),
        quantizer=block.quantizer,
        group_size=block.group_size,
        cols=int(block.codes.shape[1]),
        meta_shapes=meta,
    )


def _meta_shapes_ok(s: BlockSpec) -> bool:
    """Whether the metadata shapes are ones that ``quantizers.dequantize`` decodes."""
    if s.quantizer == "uniform":
        groups = 1 if s.group_size is None else -(-s.cols // s.group_size)
        allowed = {(s.n_rows, groups), (s.n_rows, 1)}  # a single column broadcasts over groups
        return s.meta_shapes["scale"] == s.meta_shapes["zero"] and s.meta_shapes["scale"] in allowed
    return s.meta_shapes["codebook"] in {(2**s.bits,), (s.n_rows, 2**s.bits)}


def _check_specs(specs: Sequence[BlockSpec], weight_shape: tuple[int, ...]) -> None:
    """Blocks must tile the output channels in order, each with the layer's column count."""
    cols = math.prod(weight_shape[1:])
    if not specs:
        raise ValueError(f"a quantized layer needs at least one block; weight shape {weight_shape}")
    start = 0
    for i, s in enumerate(specs):
        check_bits(s.bits)
        if s.quantizer not in _META or set(s.meta_shapes) != set(_META[s.quantizer]):
            raise ValueError(
                f"block {i}: quantizer {s.quantizer!r} with metadata {sorted(s.meta_shapes)}; "
                f"expected 'uniform' (scale, zero) or 'nonuniform' (codebook)"
            )
        if s.rows[0] != start or s.rows[1] <= s.rows[0]:
            raise ValueError(
                f"block {i} covers rows {s.rows}, expected a non-empty range starting at {start}: "
                f"blocks must tile the output channels in order"
            )
        if s.cols != cols:
            raise ValueError(
                f"block {i} has {s.cols} columns, the weight {weight_shape} has {cols}"
            )
        if not _meta_shapes_ok(s):
            raise ValueError(
                f"block {i} ({s.quantizer}, {s.bits} bits, {s.n_rows} rows, group_size "
                f"{s.group_size}) has metadata shapes {s.meta_shapes}; expected scale/zero "
                f"(rows, n_groups) or a codebook (2**bits,) / (rows, 2**bits)"
            )
        start = s.rows[1]
    if start != weight_shape[0]:
        raise ValueError(
            f"blocks cover {start} rows, the weight {weight_shape} has {weight_shape[0]}"
        )


_WORKSPACE = threading.local()


def _workspace(n: int, device: torch.device) -> torch.Tensor:
    """This thread's fp32 decode buffer on ``device``, at least ``n`` values (grown, kept)."""
    bufs = getattr(_WORKSPACE, "bufs", None)
    if bufs is None:
        bufs = _WORKSPACE.bufs = {}
    buf = bufs.get(device)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = bufs[device] = torch.empty(n, dtype=torch.float32, device=device)
    return buf


def release_workspace() -> None:
    """Free this thread's decode buffers (as large as the largest packed layer decoded)."""
    _WORKSPACE.bufs = {}


class _QuantizedWeight(nn.Module):
    """Shared storage and decoding of the packed weight; subclasses add the float op."""

    kind = ""

    def __init__(
        self,
        weight_shape: Sequence[int],
        specs: Sequence[BlockSpec],
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        cache_dequantized: bool = False,
    ) -> None:
        super().__init__()
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.specs = list(specs)
        _check_specs(self.specs, self.weight_shape)
        self.cache_dequantized = cache_dequantized
        self._cached: torch.Tensor | None = None
        self.kernel = "exact"  # "auto": stock int4/int8 kernels where they win (Linear only)
        self._fast: kernels.FastWeight | None = None
        self._fast_why: str | None = None  # None: not prepared yet
        self._tuned = False  # start_tuning .. finish_tuning
        for i, s in enumerate(self.specs):
            self.register_buffer(
                f"block{i}_codes", torch.zeros(s.code_bytes, dtype=torch.uint8, device=device)
            )
            for name, shape in s.meta_shapes.items():
                self.register_buffer(
                    f"block{i}_{name}", torch.zeros(shape, dtype=torch.float16, device=device)
                )
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.weight_shape[0], dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, module: nn.Module, layer_result: LayerResult,
                   cache_dequantized: bool = False) -> _QuantizedWeight:
        """Pack the blocks of ``layer_result`` for ``module`` (bias and layer options copied)."""
        if not isinstance(module, FLOAT_TYPES[cls.kind]):
            raise TypeError(f"layer {layer_result.name!r}: expected "
                            f"nn.{FLOAT_TYPES[cls.kind].__name__}, got {type(module).__name__}")
        return cls._from_layer(module, layer_result, cache_dequantized=cache_dequantized,
                               **cls._float_options(module))

    @staticmethod
    def _float_options(module: nn.Module) -> dict:
        """Constructor options read from the float layer besides its weight and bias."""
        return {}

    @classmethod
    def _from_layer(cls, module: nn.Module, layer: LayerResult, **kwargs) -> _QuantizedWeight:
        shape = tuple(module.weight.shape)
        if tuple(layer.weight_shape) != shape:
            raise ValueError(
                f"layer {layer.name!r}: result is for weight shape {tuple(layer.weight_shape)}, "
                f"the module's weight is {shape}"
            )
        if layer.kind != cls.kind:
            raise ValueError(f"layer {layer.name!r} is a {layer.kind!r} result, not {cls.kind!r}")
        specs = [block_spec(b) for b in layer.blocks]
        bias = module.bias
        device = module.weight.device
        q = cls(
            shape,
            specs,
            bias=bias is not None,
            dtype=bias.dtype if bias is not None else torch.float32,
            device=device,
            **kwargs,
        )
        with torch.no_grad():
            for i, (s, b) in enumerate(zip(specs, layer.blocks, strict=True)):
                if b.codes.dtype != torch.uint8 or tuple(b.codes.shape) != (s.n_rows, s.cols):
                    raise ValueError(
                        f"layer {layer.name!r} block {i}: codes must be uint8 of shape "
                        f"{(s.n_rows, s.cols)}, got {b.codes.dtype} {tuple(b.codes.shape)}"
                    )
                getattr(q, f"block{i}_codes").copy_(pack_codes(b.codes.to(device), s.bits))
                for name in s.meta_shapes:
                    t = getattr(b, name)
                    # Converting here would decode differently from dequantize(block).
                    if t.dtype != torch.float16:
                        raise TypeError(
                            f"layer {layer.name!r} block {i}: {name} must be float16, got {t.dtype}"
                        )
                    getattr(q, f"block{i}_{name}").copy_(t)
            if bias is not None:
                q.bias.copy_(bias)
                q.bias.requires_grad_(bias.requires_grad)
        q.train(module.training)
        return q

    def blocks(self) -> list[BlockResult]:
        """The blocks as :class:`~bayesq_lightning.result.BlockResult` with unpacked codes.

        Codes are fresh tensors; scale, zero and codebook are this module's buffers (not copies).
        """
        out = []
        for i, s in enumerate(self.specs):
            codes = unpack_codes(getattr(self, f"block{i}_codes"), s.bits, s.n_weights)
            meta = {name: getattr(self, f"block{i}_{name}") for name in s.meta_shapes}
            out.append(
                BlockResult(
                    rows=s.rows,
                    bits=s.bits,
                    quantizer=s.quantizer,
                    group_size=s.group_size,
                    codes=codes.view(s.n_rows, s.cols),
                    **meta,
                )
            )
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight, shape ``weight_shape``, decoded block by block (into ``out``, an
        fp32 ``(out_channels, cols)`` tensor, when given: uniform blocks only)."""
        if self._tuned:
            return self._tuned_weight(dtype)
        if out is not None:
            for b in self.blocks():
                dequantize(b, torch.float32, out=out[b.rows[0]:b.rows[1]])
            return out.view(self.weight_shape)
        parts = [dequantize(b, dtype) for b in self.blocks()]
        w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return w.reshape(self.weight_shape)

    def _forward_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight for one forward pass.

        Without autograd, with fp32 inputs and uniform blocks, the layer decodes into a buffer
        shared by every packed layer of this thread (the next layer's forward overwrites it, so
        it is never handed out where a graph or a caller could keep it); otherwise
        :meth:`_weight`.
        """
        if (torch.is_grad_enabled() or dtype != torch.float32 or self._tuned
                or self.cache_dequantized
                or any(s.quantizer != "uniform" for s in self.specs)):
            return self._weight(dtype)
        n = math.prod(self.weight_shape)
        buf = _workspace(n, self.block0_codes.device)[:n].view(self.weight_shape[0], -1)
        return self.dequantize(torch.float32, out=buf)

    # ------------------------------------------------------------------ tuning
    def start_tuning(self, meta: Sequence[str]) -> list[nn.Parameter]:
        """Make the named quantizer parameters trainable; the integer codes stay frozen.

        For each block and each name in ``meta`` (``"scale"``, ``"zero"``, ``"codebook"``) that
        the block has, an fp32 master copy ``block<i>_<name>_master`` becomes an
        ``nn.Parameter``. While tuning, ``forward`` decodes with the masters rounded to fp16
        (straight-through gradient), so the model trained and evaluated is the one
        :meth:`finish_tuning` stores. The codes are unpacked once and kept.

        Returns
        -------
        list of nn.Parameter
            The new masters (empty when no block has any of ``meta``).
        """
        if self._tuned:
            raise RuntimeError("this layer is already being tuned; call finish_tuning() first")
        masters = []
        for i, (s, b) in enumerate(zip(self.specs, self.blocks(), strict=True)):
            for name in s.meta_shapes:
                if name in meta:
                    p = nn.Parameter(getattr(self, f"block{i}_{name}").detach().float().clone())
                    self.register_parameter(f"block{i}_{name}_master", p)
                    masters.append(p)
            # frozen codes, unpacked once; a buffer so that .to(device) moves it
            self.register_buffer(f"block{i}_unpacked", b.codes, persistent=False)
        self._tuned = True
        self._invalidate()
        return masters

    def _tuned_weight(self, dtype: torch.dtype) -> torch.Tensor:
        parts = []
        for i, s in enumerate(self.specs):
            meta = {}
            for name in s.meta_shapes:
                m = getattr(self, f"block{i}_{name}_master", None)
                # the fp16 value in the forward, the gradient straight through to the master
                meta[name] = (getattr(self, f"block{i}_{name}") if m is None
                              else m + (m.half().float() - m).detach())
            block = BlockResult(rows=s.rows, bits=s.bits, quantizer=s.quantizer,
                                group_size=s.group_size, codes=getattr(self, f"block{i}_unpacked"),
                                **meta)
            parts.append(dequantize(block, dtype))
        return torch.cat(parts, dim=0).reshape(self.weight_shape)

    def finish_tuning(self) -> None:
        """Round the masters to fp16 into the buffers and drop them; the layer is packed again."""
        if not self._tuned:
            return
        with torch.no_grad():
            for i, s in enumerate(self.specs):
                for name in s.meta_shapes:
                    key = f"block{i}_{name}_master"
                    m = getattr(self, key, None)
                    if m is not None:
                        getattr(self, f"block{i}_{name}").copy_(m.detach().half())
                        delattr(self, key)
                delattr(self, f"block{i}_unpacked")
        self._tuned = False
        self._invalidate()

    def to_float(self, weight: torch.Tensor | None = None) -> nn.Module:
        """The float layer (``nn.Linear`` / ``nn.Conv2d``) holding ``weight`` (default: decoded)."""
        w = self.dequantize() if weight is None else weight
        if tuple(w.shape) != self.weight_shape:
            raise ValueError(f"weight of shape {tuple(w.shape)} for a layer of {self.weight_shape}")
        m = self._float_layer()
        with torch.no_grad():
            m.weight.copy_(w)
            if self.bias is not None:
                m.bias.copy_(self.bias)
        return m.to(self.block0_codes.device)

    @property
    def weight(self) -> torch.Tensor:
        """Read-only fp32 dequantized weight, for code that inspects ``module.weight``."""
        return self._weight(torch.float32)

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        cached = self._cached
        if (
            not self._tuned
            and self.cache_dequantized
            and cached is not None
            and cached.dtype == dtype
            and cached.device == self.block0_codes.device
        ):
            return cached
        w = self.dequantize(dtype)
        if self.cache_dequantized and not self._tuned:
            self._cached = w
        return w

    def clear_cache(self) -> None:
        """Drop the cached dequantized weight (call after editing the buffers in place)."""
        self._invalidate()

    def _invalidate(self) -> None:
        self._cached = None
        self._fast, self._fast_why = None, None

    def _apply(self, fn, recurse: bool = True):
        # .to(device / dtype), .cuda(), .half(): the decoded and repacked weights are stale
        out = super()._apply(fn, recurse)
        self._invalidate()
        return out

    def __getstate__(self) -> dict:
        # the int4 layout depends on the CPU that packed it: never pickled, repacked on use
        return {**super().__getstate__(), "_cached": None, "_fast": None, "_fast_why": None}

    def fast_weight(self) -> tuple[kernels.FastWeight | None, str]:
        """This layer in a stock kernel's layout (prepared once), or ``(None, why not)``."""
        if self._fast_why is None:
            if self.kind != "linear":
                self._fast, self._fast_why = None, "a convolution (no integer conv kernel)"
            else:
                self._fast, self._fast_why = kernels.prepare(
                    self.blocks(), self.weight_shape, self.block0_codes.device)
        return self._fast, self._fast_why

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._invalidate()  # new buffers invalidate the decoded and repacked weights
        super()._load_from_state_dict(*args, **kwargs)

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        bits = ",".join(str(s.bits) for s in self.specs)
        return f"weight_shape={self.weight_shape}, bits=[{bits}], bias={self.bias is not None}"


class QuantizedLinear(_QuantizedWeight):
    """``nn.Linear`` with packed integer weights; ``forward`` dequantizes in the input dtype.

    Parameters
    ----------
    weight_shape : sequence of int
        ``(out_features, in_features)``.
    specs : sequence of BlockSpec
        Block layouts tiling the output features in order.
    bias : bool
        Whether the layer has a bias.
    dtype : torch.dtype
        dtype of the bias.
    device : torch.device or str, optional
        Where the buffers live.
    cache_dequantized : bool
        Keep the decoded weight after the first forward (faster, costs a float weight of memory).
    """

    kind = "linear"

    def __init__(self, weight_shape: Sequence[int], specs: Sequence[BlockSpec], **kwargs) -> None:
        if len(weight_shape) != 2:
            raise ValueError(f"a linear weight is (out, in), got shape {tuple(weight_shape)}")
        super().__init__(weight_shape, specs, **kwargs)
        self.out_features, self.in_features = self.weight_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "auto" and not self._tuned and not (
                torch.is_grad_enabled() and (x.requires_grad or (
                    self.bias is not None and self.bias.requires_grad))):
            fast, _ = self.fast_weight()
            if fast is not None and kernels.rows_of(x) <= kernels.MAX_ROWS[fast.kind]:
                return kernels.linear(x, fast, self.bias)
        return F.linear(x, self._forward_weight(x.dtype), self._bias(x))

    def _float_layer(self) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class QuantizedConv2d(_QuantizedWeight):
    """``nn.Conv2d`` with packed integer weights; ``forward`` dequantizes in the input dtype.

    Parameters
    ----------
    weight_shape : sequence of int
        ``(out_channels, in_channels // groups, kh, kw)``.
    specs : sequence of BlockSpec
        Block layouts tiling the output channels in order.
    stride, padding, dilation, groups
        As for ``nn.Conv2d`` (``padding`` may be ``"same"`` or ``"valid"``).
    padding_mode : str
        Only ``"zeros"`` is supported.
    **kwargs
        ``bias``, ``dtype``, ``device``, ``cache_dequantized`` as for :class:`QuantizedLinear`.
    """

    kind = "conv2d"

    def __init__(
        self,
        weight_shape: Sequence[int],
        specs: Sequence[BlockSpec],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        **kwargs,
    ) -> None:
        if len(weight_shape) != 4:
            raise ValueError(
                f"a conv2d weight is (out, in/groups, kh, kw), got {tuple(weight_shape)}"
            )
        if padding_mode != "zeros":
            raise NotImplementedError(
                f"padding_mode={padding_mode!r} is not supported by QuantizedConv2d; only 'zeros' "
                f"is: exclude this layer from quantization or use zero padding"
            )
        super().__init__(weight_shape, specs, **kwargs)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        self.out_channels = self.weight_shape[0]
        self.in_channels = self.weight_shape[1] * self.groups
        self.kernel_size = tuple(self.weight_shape[2:])

    @staticmethod
    def _float_options(module: nn.Module) -> dict:
        return conv_options(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x,
            self._forward_weight(x.dtype),
            self._bias(x),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def _float_layer(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                         bias=self.bias is not None, **conv_options(self))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}"
        )


def conv_options(module: nn.Conv2d | QuantizedConv2d) -> dict:
    """The ``stride/padding/dilation/groups/padding_mode`` of a (quantized) conv, as plain data."""
    padding = module.padding
    return {
        "stride": list(module.stride),
        "padding": padding if isinstance(padding, str) else list(padding),
        "dilation": list(module.dilation),
        "groups": int(module.groups),
        "padding_mode": module.padding_mode,
    }


QUANTIZED_TYPES: dict[str, type[_QuantizedWeight]] = {
    "linear": QuantizedLinear,
    "conv2d": QuantizedConv2d,
}
FLOAT_TYPES: dict[str, type[nn.Module]] = {"linear": nn.Linear, "conv2d": nn.Conv2d}


def quantized_from_float(
    module: nn.Module, layer: LayerResult, cache: bool = False
) -> QuantizedLinear | QuantizedConv2d:
    """The packed replacement of one float layer."""
    cls = QUANTIZED_TYPES.get(layer.kind)
    if cls is None:
        raise ValueError(
            f"layer {layer.name!r}: unknown kind {layer.kind!r}; expected {list(QUANTIZED_TYPES)}"
        )
    return cls.from_float(module, layer, cache_dequantized=cache)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (not the root) by ``module``, under every
    name the old submodule is registered (``self.b = self.a`` makes ``a`` and ``b`` one layer)."""
    if not name:
        raise ValueError("cannot replace the root module in place; wrap it in a parent module")
    for n in module_paths(model, model.get_submodule(name)) or [name]:
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent), leaf, module)


def module_paths(model: nn.Module, module: nn.Module) -> list[str]:
    """Every dotted name under which ``module`` is registered in ``model``."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


def packed_alias(module: nn.Module, owner_layer: LayerResult, owner: _QuantizedWeight,
                 name: str, cache: bool = False) -> _QuantizedWeight:
    """The packed replacement of float layer ``module`` (at ``name``) that holds the weight of
    the layer ``owner_layer`` describes: ``owner``'s codes, its own bias and layer options."""
    q = quantized_from_float(module, dataclasses.replace(owner_layer, name=name), cache)
    tie_packed(q, owner)
    return q


def tie_packed(alias: _QuantizedWeight, owner: _QuantizedWeight) -> None:
    """Make ``alias`` decode ``owner``'s codes and metadata (the same tensors, stored once);
    the bias stays its own."""
    if alias.specs != owner.specs or alias.weight_shape != owner.weight_shape:
        raise ValueError("tied packed layers must have the same blocks and weight shape")
    for key, buf in owner.named_buffers(recurse=False):
        if key in alias._buffers:
            setattr(alias, key, buf)


def replace_quantized_layers(
    model: nn.Module, layers: Sequence[LayerResult], cache: bool = False,
    tied: Mapping[str, str] | None = None,
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

    Returns
    -------
    nn.Module
        ``model`` itself.
    """
    new = {}
    by_name = {x.name: x for x in layers}
    for name, owner in [*((x.name, None) for x in layers), *(tied or {}).items()]:
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise KeyError(f"model has no layer named {name!r}") from e
        if owner is None:
            new[name] = quantized_from_float(module, by_name[name], cache)
        elif owner not in new:
            raise KeyError(f"tied layer {name!r} names {owner!r}, which is not quantized")
        else:
            new[name] = packed_alias(module, by_name[owner], new[owner], name, cache)
    for name, module in new.items():
        set_submodule(model, name, module)
    return model


KERNELS = ("exact", "auto")


def set_kernel(model: nn.Module, kernel: str = "auto") -> dict[str, str]:
    """Choose how the packed Linear layers of ``model`` multiply, in place.

    ``"auto"``: repack each layer once for stock PyTorch's CPU int4 / int8 weight-only kernels
    (:mod:`~bayesq_lightning.artifact.kernels`) and use them where they win, i.e. with few
    activation rows (bf16 activations: outputs within ``kernels.RTOL`` of the exact path);
    ``"exact"`` (the default of every packed layer): decode the stored weights, bit for bit.
    The artifact is unaffected either way.

    Returns
    -------
    dict
        ``{layer: why it stays exact}`` for the layers ``"auto"`` cannot serve (also warned,
        once, here).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
    exact = {}
    for name, module in model.named_modules():
        if isinstance(module, _QuantizedWeight):
            module.kernel = kernel
            if kernel == "exact":
                module._invalidate()  # drops the repacked copy
            elif module.kind == "linear":
                fast, why = module.fast_weight()
                if fast is None:
                    exact[name] = why
    if exact:
        warnings.warn(f"kernel='auto': {len(exact)} packed Linear layer(s) keep the exact path: "
                      f"{dict(list(exact.items())[:5])}", stacklevel=2)
    return exact
