r"""Fast CPU matmuls for packed Linear layers from stock PyTorch's weight-only kernels.

A packed layer stores ``W = s (q - z)`` (per block, per row or group). Decoding it on every
forward costs more than the matmul when there are few activation rows (decode-like inference);
stock PyTorch has two weight-only kernels that read integer weights directly:

* **int4** (``aten._weight_int4pack_mm_for_cpu``): weights ``q4`` in ``[0, 16)`` packed by
  ``aten._convert_weight_to_int4pack_for_cpu``, with per-group ``(scale, zero)`` along the input
  dimension, ``W = (q4 - 8) s + z_f``. Our ``b``-bit codes (2, 3 or 4 bits) become
  ``q4 = q + c`` with ``c = 8 - 2^(b-1)`` (centred on the kernel's midpoint) and
  ``z_f = s (8 - c - z)``, small, so bf16 rounding of it barely moves the weight; per-channel
  scales repeat over groups of
  ``g``, the largest of 256 / 128 / 64 / 32 dividing ``in_features``. Needs ``out_features``
  divisible by 16.
* **int8** (``aten._weight_int8pack_mm``): symmetric per output channel, ``y = x (s q8)^T``.
  With ``q8 = q - 128``, ``W = s (q - z) = s q8 + s (128 - z)``, so the asymmetric zero point
  adds ``sum(x) s (128 - z)`` per output. Needs 8-bit per-channel blocks throughout and
  ``in_features`` divisible by 32 (the stock kernel reads out of bounds otherwise).

Both run with bfloat16 activations (far slower with fp32 ones): the results differ from the
exact path by bf16 rounding of the activations, scales and zeros (:data:`RTOL`). They win only
with few rows: the int4 kernel up to :data:`MAX_ROWS` ``["int4"]`` rows, int8 up to
``["int8"]`` (``benchmarks/footprint.py`` measures the crossover). Everything else --
codebooks, mixed 8-bit and lower widths, unsupported shapes, other devices, more rows -- decodes
exactly (:func:`~bayesq_lightning.artifact.dispatch.fast_linear` returns ``None``). The repacked
weight lives beside the module's buffers, never in its state dict: the artifact keeps its exact
packed widths.

The ``aten._weight_int*`` / ``aten._convert_weight_to_int4pack_for_cpu`` operators are private
to PyTorch and are used only here; written against torch 2.14. :func:`available` reports a
build without them, and ``tests/test_kernels.py`` fails loudly when their layout or results
change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..quantizers import expand_groups

GROUPS = (256, 128, 64, 32)  # the int4 kernel's group sizes, largest first
MAX_ROWS = {"int4": 16, "int8": 8}  # most activation rows at which a kernel beats fp32
RTOL = 1e-2  # relative L2 error of outputs against the exact path (bf16 rounding)


@dataclass
class FastWeight:
    """A packed layer's weight in a stock kernel's layout."""

    kind: str  # "int4" | "int8"
    packed: Tensor
    scale: Tensor  # int4: (K / g, N, 2) bf16 scale and zero; int8: (N,) bf16 scales
    group: int = 0  # int4 group size
    offset: Tensor | None = None  # int8: s (128 - z), (N,) fp32

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset)
                   if t is not None)


def available() -> bool:
    """Whether this torch build has the CPU weight-only kernels."""
    ops = torch.ops.aten
    return all(hasattr(ops, name) for name in ("_weight_int4pack_mm_for_cpu",
                                               "_convert_weight_to_int4pack_for_cpu",
                                               "_weight_int8pack_mm"))


def prepare(blocks: list, weight_shape: tuple[int, ...], device: torch.device
            ) -> tuple[FastWeight | None, str]:
    """The fast layout of a layer's blocks, or ``(None, why not)``."""
    if device.type != "cpu":
        return None, f"device {device.type} (the kernels are CPU ones)"
    if not available():
        return None, "this torch build lacks the CPU weight-only kernels"
    if any(b.quantizer != "uniform" for b in blocks):
        return None, "a non-uniform codebook (no integer kernel decodes a codebook)"
    n, k = weight_shape
    bits = {b.bits for b in blocks}
    if bits == {8}:
        if any(b.group_size is not None for b in blocks):
            return None, "8-bit groups (the int8 kernel is per output channel)"
        if k % 32:  # the stock kernel reads past the end otherwise
            return None, f"in_features={k} is not divisible by 32 (int8 kernel)"
        return _int8(blocks), ""
    if 8 in bits:
        return None, "8-bit blocks beside lower widths"
    if n % 16:
        return None, f"out_features={n} is not divisible by 16 (int4 kernel)"
    sizes = {b.group_size for b in blocks}
    if sizes == {None}:
        group = next((g for g in GROUPS if k % g == 0), None)
        if group is None:
            return None, f"in_features={k} is not divisible by 32 (int4 kernel groups)"
    elif len(sizes) == 1 and next(iter(sizes)) in GROUPS and k % next(iter(sizes)) == 0:
        group = next(iter(sizes))
    else:
        return None, f"group sizes {sorted(sizes, key=str)} (int4 kernel: 32, 64, 128 or 256)"
    return _int4(blocks, k, group), ""


def _int4(blocks: list, k: int, group: int) -> FastWeight:
    # b-bit codes shifted by c = 8 - 2^(b-1) to sit around the kernel's midpoint 8: then
    # z_f = s (8 - c - z) = s (2^(b-1) - z) is small and its bf16 rounding barely matters
    shift = [8 - 2 ** (b.bits - 1) for b in blocks]
    codes = torch.cat([b.codes.to(torch.int32) + c for b, c in zip(blocks, shift, strict=True)])
    s = torch.cat([_per_group(b.scale, b.group_size, k, group) for b in blocks])
    z = torch.cat([_per_group(b.zero, b.group_size, k, group) + c
                   for b, c in zip(blocks, shift, strict=True)])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scale_zero = torch.stack([s.t(), (s * (8 - z)).t()], dim=-1)  # (K / g, N, 2)
    return FastWeight("int4", packed, scale_zero.to(torch.bfloat16).contiguous(), group)


def _per_group(t: Tensor, group_size: int | None, k: int, group: int) -> Tensor:
    """``(rows, k // group)`` fp32 values of a block's per-row or per-group metadata."""
    return expand_groups(t, k, group_size)[:, ::group].float()


def _int8(blocks: list) -> FastWeight:
    q8 = (torch.cat([b.codes for b in blocks]).to(torch.int16) - 128).to(torch.int8)
    s = torch.cat([b.scale[:, 0] for b in blocks]).float()
    z = torch.cat([b.zero[:, 0] for b in blocks]).float()
    return FastWeight("int8", q8.contiguous(), s.to(torch.bfloat16), offset=s * (128 - z))


def rows_of(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() else 0


def linear(x: Tensor, fw: FastWeight, bias: Tensor | None) -> Tensor:
    """``x W^T + b`` through the kernel; ``x`` any shape ``(..., K)``, output in ``x.dtype``."""
    x2 = x.reshape(-1, x.shape[-1])
    xb = x2.to(torch.bfloat16).contiguous()  # both kernels need a dense row-major A
    if fw.kind == "int4":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, fw.packed, fw.group, fw.scale)
    else:
        y = torch.ops.aten._weight_int8pack_mm(xb, fw.packed, fw.scale)
        y = torch.addcmul(y.float(), x2.sum(-1, keepdim=True).float(), fw.offset)
    # one op adds the bias and leaves bf16 (type promotion): per-call overhead matters here
    y = y.to(x.dtype) if bias is None else torch.add(bias.to(x.dtype), y).to(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])
