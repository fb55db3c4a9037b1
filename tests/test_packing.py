"""Tests of bit-packing of integer codes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bayesq_lightning.artifact.packing import pack_codes, packed_nbytes, unpack_codes
from bayesq_lightning.quantizers import storage_bits

BITS = (2, 3, 4, 8)


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from(BITS), n=st.integers(0, 5000), seed=st.integers(0, 2**31 - 1))
def test_round_trip_and_exact_size(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    buf = pack_codes(codes, bits)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    assert buf.numel() == storage_bits(n, bits, 0) // 8 == packed_nbytes(n, bits)
    out = unpack_codes(buf, bits, n)
    assert out.dtype == torch.uint8 and out.shape == (n,)
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 23, 24, 25])
def test_edges_with_all_ones(bits, n):
    # All-ones codes catch lost or overlapping bits at group and byte boundaries.
    codes = torch.full((n,), 2**bits - 1, dtype=torch.uint8)
    buf = pack_codes(codes, bits)
    assert buf.numel() == -(-n * bits // 8)
    assert torch.equal(unpack_codes(buf, bits, n), codes)
    used = n * bits
    if used % 8:
        # The unused high bits of the last byte are zero.
        assert int(buf[-1]) == 2 ** (used % 8) - 1


def test_layout_is_lsb_first():
    # 2-bit: code 0 in the low bits of byte 0.
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    assert pack_codes(torch.tensor([0xA, 0x5, 0x3], dtype=torch.uint8), 4).tolist() == [0x5A, 0x03]
    # 3-bit: 8 codes form one little-endian 24-bit word.
    codes = torch.arange(8, dtype=torch.uint8)
    word = sum(k << (3 * k) for k in range(8))
    assert pack_codes(codes, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    assert pack_codes(torch.tensor([5], dtype=torch.uint8), 3).tolist() == [5]


def test_any_shape_is_flattened_in_c_order():
    codes = torch.randint(0, 8, (3, 5, 7), dtype=torch.uint8)
    buf = pack_codes(codes, 3)
    assert buf.numel() == -(-105 * 3 // 8)
    assert torch.equal(unpack_codes(buf, 3, 105), codes.reshape(-1))
    # A non-contiguous view packs by its logical order.
    t = codes.transpose(0, 2)
    assert torch.equal(unpack_codes(pack_codes(t, 3), 3, 105), t.reshape(-1))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="exceed 2 bits"):
        pack_codes(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="uint8"):
        pack_codes(torch.tensor([1]), 2)
    with pytest.raises(ValueError, match="unsupported bit-width"):
        pack_codes(torch.zeros(4, dtype=torch.uint8), 5)
    buf = pack_codes(torch.zeros(10, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="need 4"):
        unpack_codes(buf[:3], 3, 10)
    with pytest.raises(ValueError, match="need 3"):
        unpack_codes(buf, 3, 8)
