"""Bit-packing of integer codes into byte buffers.

Layout: codes are laid out back to back, least significant bit first. Code ``i`` occupies bits
``[i * bits, (i + 1) * bits)`` of the buffer, and bit ``j`` of the buffer is bit ``j % 8`` of byte
``j // 8``. So 2- and 4-bit codes fill bytes from the low end (code 0 in the low nibble), and
3-bit codes pack 8 codes into 3 bytes (one little-endian 24-bit word). A buffer of ``n`` codes
holds exactly ``ceil(n * bits / 8)`` bytes, as :func:`bayesq_lightning.tables.storage_bits`
counts; the unused high bits of the last byte are zero. The buffer does not record ``n``: the
caller stores it (block shapes) and passes it back to :func:`unpack_codes`.
"""

from __future__ import annotations

import torch

from ..quantizers import check_bits


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of a packed buffer of ``n`` codes: ``ceil(n * bits / 8)``."""
    return -(-n * check_bits(bits) // 8)


def _group(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte group: 8 // bits codes in 1 byte, or 8 in 3."""
    return (8, 3) if bits == 3 else (8 // bits, 1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8`` codes (any shape, flattened in C order) into ``ceil(n * bits / 8)`` bytes.

    Parameters
    ----------
    codes : torch.Tensor
        ``uint8`` codes in ``[0, 2**bits)``.
    bits : int
        Bits per code, one of 2, 3, 4, 8.

    Returns
    -------
    torch.Tensor
        ``uint8`` buffer of shape ``(ceil(n * bits / 8),)`` on the device of ``codes``.
    """
    bits = check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n and int(flat.max()) >= 2**bits:
        raise ValueError(f"codes exceed {bits} bits (max code {int(flat.max())})")
    if bits == 8:
        return flat.clone()
    per, nbytes = _group(bits)
    # Zero padding to whole groups; it only touches bytes past ceil(n * bits / 8), cut below.
    pad = -n % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per).to(torch.int32)
    shifts = torch.arange(per, device=flat.device, dtype=torch.int32) * bits
    words = (flat << shifts).sum(dim=1, dtype=torch.int32)  # disjoint bits: sum == bitwise or
    if nbytes == 1:
        out = words
    else:
        byte_shifts = torch.arange(nbytes, device=flat.device, dtype=torch.int32) * 8
        out = (words.unsqueeze(1) >> byte_shifts) & 0xFF
    return out.reshape(-1)[: packed_nbytes(n, bits)].to(torch.uint8)


def unpack_codes(buf: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes of a packed buffer.

    Parameters
    ----------
    buf : torch.Tensor
        ``uint8`` buffer of exactly ``ceil(n * bits / 8)`` bytes.
    bits : int
        Bits per code, one of 2, 3, 4, 8.
    n : int
        Number of codes, as recorded by the caller.

    Returns
    -------
    torch.Tensor
        ``uint8`` codes, shape ``(n,)``.
    """
    bits = check_bits(bits)
    if buf.dtype != torch.uint8:
        raise TypeError(f"packed buffer must be uint8, got {buf.dtype}")
    buf = buf.reshape(-1)
    expect = packed_nbytes(n, bits)
    if buf.numel() != expect:
        raise ValueError(
            f"packed buffer holds {buf.numel()} bytes, but {n} codes at {bits} bits need {expect}"
        )
    if bits == 8:
        return buf.clone()
    per, nbytes = _group(bits)
    if nbytes == 1:  # 2 and 4 bits: shift the bytes in uint8, no int32 words (4x less traffic)
        mask = 2**bits - 1
        parts = [(buf >> (i * bits)) & mask for i in range(per - 1)] + [buf >> (8 - bits)]
        return torch.stack(parts, dim=1).reshape(-1)[:n]
    if bits == 3:  # 8 codes in 3 bytes (LSB first), decoded byte-wise in uint8
        pad = -buf.numel() % 3
        b0, b1, b2 = torch.cat([buf, buf.new_zeros(pad)]).view(-1, 3).unbind(1)
        codes = torch.stack([
            b0 & 7, (b0 >> 3) & 7, (b0 >> 6) | ((b1 & 1) << 2), (b1 >> 1) & 7,
            (b1 >> 4) & 7, (b1 >> 7) | ((b2 & 3) << 1), (b2 >> 2) & 7, b2 >> 5,
        ], dim=1)
        return codes.reshape(-1)[:n]
    raise AssertionError(f"no decoder for {bits} bits")  # check_bits admits 2, 3, 4, 8 only
