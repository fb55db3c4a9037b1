"""Expected-loss tables ``D[block][bits]`` and exact storage costs ``C[block][bits]``.

``C`` comes from :func:`storage_bits` alone: tables, allocator, report and export all call it,
so what the allocator counts is what the artifact holds.
"""

from __future__ import annotations

META_BITS = 16  # every scale, zero point and codebook level is stored as fp16


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
