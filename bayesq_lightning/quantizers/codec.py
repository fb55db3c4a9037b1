"""The codec: integer codes and fp16 parameters <-> float weights, and their exact storage cost.

Everything downstream of the design (tables, allocation, packed modules, the artifact) depends on
this module and the result records only: :func:`dequantize` is the package's single decoder and
:func:`storage_bits` its single cost function, so what the allocator counts is what the file holds.
"""

from __future__ import annotations

import torch

from ..result import BlockResult

META_BITS = 16  # every scale, zero point and codebook level is stored as fp16


def expand_groups(t: torch.Tensor, n_cols: int, group_size: int | None) -> torch.Tensor:
    """Per-(row, group) values ``(rows, n_groups)`` -> per-weight ``(rows, n_cols)``.

    A ``group_size`` that does not divide ``n_cols`` leaves a shorter last group.
    """
    if group_size is None or t.shape[1] == 1:
        return t.expand(t.shape[0], n_cols)
    return t.repeat_interleave(group_size, dim=1)[:, :n_cols]


def round_levels(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bits: int | torch.Tensor) -> torch.Tensor:
    """The nearest levels ``clamp(round(w / scale + zero), 0, 2**bits - 1)`` as floats.

    One new buffer in ``w``'s dtype (the search loops and the error feedback call this per
    candidate and column). ``scale`` and ``zero`` broadcast to ``w`` and are used exactly as
    stored (fp16 values); ``bits`` may be an integer tensor broadcasting to ``w`` (one width per
    row of a stack of candidates), giving each width's own levels.
    """
    s, z = scale.to(w.dtype), zero.to(w.dtype)
    x = torch.div(w, s).add_(z).round_()
    if torch.is_tensor(bits):
        return torch.minimum(x.clamp_(min=0), (2**bits - 1).to(x.dtype), out=x)
    return x.clamp_(0, 2**bits - 1)


def round_uniform(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bits: int | torch.Tensor) -> torch.Tensor:
    """Nearest-level codes (:func:`round_levels`) as ``uint8``."""
    return round_levels(w, scale, zero, bits).to(torch.uint8)


def dequantize(block: BlockResult, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Float weights ``(rows, cols)`` of a block from its codes and fp16 parameters.

    The single decoder of the package: the in-memory model, packed modules and loaded artifacts
    all call it, so their weights agree bit for bit. ``out`` (fp32, ``(rows, cols)``, uniform
    blocks only) receives the weights instead of a new tensor: the packed layers' inference
    path decodes into one reused buffer (no allocation, no page faults per forward).
    """
    codes = block.codes
    if block.quantizer == "uniform":
        cols = codes.shape[1]
        # to fp32 before expanding: a per-row value stays a stride-0 view, never a full tensor
        s = expand_groups(block.scale.float(), cols, block.group_size)
        z = expand_groups(block.zero.float(), cols, block.group_size)
        w = codes.float() if out is None else out.copy_(codes)
        return w.sub_(z).mul_(s).to(dtype)  # in place: at most one full-size temporary
    if block.quantizer == "nonuniform":
        book = block.codebook.float()
        if book.dim() == 1:
            return book[codes.long()].to(dtype)
        return torch.gather(book, 1, codes.long()).to(dtype)
    raise ValueError(f"unknown quantizer {block.quantizer!r}; expected 'uniform' or 'nonuniform'")


def storage_bits(n_weights: int, bits: int, n_meta: int) -> int:
    """Exact stored bits of one block: one packed code buffer plus fp16 metadata.

    Parameters
    ----------
    n_weights : int
        Codes in the block.
    bits : int
        Bits per code.
    n_meta : int
        fp16 values stored with the block (scales, zeros, codebook levels).

    Returns
    -------
    int
        ``8 * ceil(n_weights * bits / 8) + 16 * n_meta``.
    """
    return 8 * (-(-n_weights * bits // 8)) + META_BITS * n_meta


def block_storage_bits(block) -> int:
    """:func:`storage_bits` of a :class:`~bayesq_lightning.result.BlockResult`."""
    return storage_bits(block.n_weights, block.bits, block.n_meta)
