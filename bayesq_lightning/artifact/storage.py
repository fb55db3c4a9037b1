"""Storage and decoding of a packed weight: the base of the packed layers.

A packed layer keeps, per block (a slice of output channels), one packed ``uint8`` code buffer
and the block's fp16 quantizer parameters as buffers, so ``state_dict()`` is the artifact's
content:

``<layer>.block<i>_codes``
    packed codes (:func:`bayesq_lightning.artifact.packing.pack_codes`), ``ceil(n * bits / 8)`` bytes;
``<layer>.block<i>_scale``, ``<layer>.block<i>_zero``
    fp16 ``(rows, n_groups)``, uniform blocks;
``<layer>.block<i>_codebook``
    fp16 ``(2**bits,)`` or ``(rows, 2**bits)``, non-uniform blocks;
``<layer>.bias``
    the float module's bias, unchanged.

Each block's layout is a :class:`~bayesq_lightning.artifact.manifest.BlockSpec` kept on the
module, so a module can be rebuilt empty from the manifest and filled by ``load_state_dict``. The
weights are decoded by :func:`bayesq_lightning.quantizers.dequantize`, the package's single
decoder, so a packed layer computes exactly what a float layer holding the dequantized weights
computes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import nn

from ..quantizers import check_bits, dequantize
from ..result import BlockResult, LayerResult
from . import tuning
from .manifest import META_NAMES, BlockSpec, block_spec
from .packing import pack_codes, unpack_codes


class DecodeBuffer:
    """Scratch fp32 memory into which packed layers decode their weight for one forward pass.

    The packed layers put into one model share one buffer
    (:func:`~bayesq_lightning.artifact.replace.swap_in`), so decoding needs the largest layer's
    float weight, not the model's. The tensors are per thread: two threads running the same
    model at once would otherwise decode into the same memory. A copy or a pickle starts empty.
    """

    def __init__(self) -> None:
        self._threads = threading.local()

    def get(self, n: int, device: torch.device) -> torch.Tensor:
        """This thread's buffer on ``device``, at least ``n`` values (grown, then kept)."""
        bufs = getattr(self._threads, "bufs", None)
        if bufs is None:
            bufs = self._threads.bufs = {}
        buf = bufs.get(device)
        if buf is None or buf.numel() < n:
            with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
                buf = bufs[device] = torch.empty(n, dtype=torch.float32, device=device)
        return buf

    def release(self) -> None:
        """Free this thread's tensors (as large as the largest layer decoded)."""
        self._threads.bufs = {}

    def __reduce__(self):
        return (DecodeBuffer, ())


def _meta_shapes_ok(s: BlockSpec) -> bool:
    """Whether the metadata shapes are ones that ``quantizers.dequantize`` decodes."""
    if s.quantizer == "uniform":
        groups = 1 if s.group_size is None else -(-s.cols // s.group_size)
        allowed = {(s.n_rows, groups), (s.n_rows, 1)}  # a single column broadcasts over groups
        return s.meta_shapes["scale"] == s.meta_shapes["zero"] and s.meta_shapes["scale"] in allowed
    return s.meta_shapes["codebook"] in {(2**s.bits,), (s.n_rows, 2**s.bits)}


def check_specs(specs: Sequence[BlockSpec], weight_shape: tuple[int, ...]) -> None:
    """Blocks must tile the output channels in order, each with the layer's column count."""
    cols = math.prod(weight_shape[1:])
    if not specs:
        raise ValueError(f"a quantized layer needs at least one block; weight shape {weight_shape}")
    start = 0
    for i, s in enumerate(specs):
        check_bits(s.bits)
        if s.quantizer not in META_NAMES or set(s.meta_shapes) != set(META_NAMES[s.quantizer]):
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


class PackedLayer(nn.Module):
    """Shared storage and decoding of the packed weight; subclasses add the float op.

    Subclasses set ``kind`` and ``float_type`` (the float layer they replace) and define
    ``forward`` and ``_float_layer``.
    """

    kind = ""
    float_type: type[nn.Module] = nn.Module

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
        check_specs(self.specs, self.weight_shape)
        self.cache_dequantized = cache_dequantized
        self._cached: torch.Tensor | None = None
        self.decode_buffer = DecodeBuffer()  # replaced by the model's shared one on swap_in
        self.kernel = "exact"  # or "auto": see dispatch.set_kernel
        self._fast = None  # the weight in a stock kernel's layout (dispatch.fast_weight)
        self._fast_why: str | None = None  # why there is none; None: not prepared yet
        self.is_tuning = False  # between tuning.start_tuning and tuning.finish_tuning
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
                   cache_dequantized: bool = False) -> PackedLayer:
        """Pack the blocks of ``layer_result`` for ``module`` (bias and layer options copied)."""
        if not isinstance(module, cls.float_type):
            raise TypeError(f"layer {layer_result.name!r}: expected "
                            f"nn.{cls.float_type.__name__}, got {type(module).__name__}")
        return cls._from_layer(module, layer_result, cache_dequantized=cache_dequantized,
                               **cls._float_options(module))

    @staticmethod
    def _float_options(module: nn.Module) -> dict:
        """Constructor options read from the float layer besides its weight and bias."""
        return {}

    @classmethod
    def _from_layer(cls, module: nn.Module, layer: LayerResult, **kwargs) -> PackedLayer:
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
        if self.is_tuning:
            return tuning.tuned_weight(self, dtype)
        if out is not None:
            for b in self.blocks():
                dequantize(b, torch.float32, out=out[b.rows[0]:b.rows[1]])
            return out.view(self.weight_shape)
        parts = [dequantize(b, dtype) for b in self.blocks()]
        w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return w.reshape(self.weight_shape)

    def _forward_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight for one forward pass.

        Without autograd, with fp32 inputs and uniform blocks, the layer decodes into its
        :class:`DecodeBuffer`, shared by the packed layers of its model (the next layer's
        forward overwrites it, so it is never handed out where a graph or a caller could keep
        it); otherwise :meth:`_weight`.
        """
        if (torch.is_grad_enabled() or dtype != torch.float32 or self.is_tuning
                or self.cache_dequantized
                or any(s.quantizer != "uniform" for s in self.specs)):
            return self._weight(dtype)
        n = math.prod(self.weight_shape)
        buf = self.decode_buffer.get(n, self.block0_codes.device)[:n]
        return self.dequantize(torch.float32, out=buf.view(self.weight_shape[0], -1))

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
            not self.is_tuning
            and self.cache_dequantized
            and cached is not None
            and cached.dtype == dtype
            and cached.device == self.block0_codes.device
        ):
            return cached
        w = self.dequantize(dtype)
        if self.cache_dequantized and not self.is_tuning:
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

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._invalidate()  # new buffers invalidate the decoded and repacked weights
        super()._load_from_state_dict(*args, **kwargs)

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        bits = ",".join(str(s.bits) for s in self.specs)
        return f"weight_shape={self.weight_shape}, bits=[{bits}], bias={self.bias is not None}"
