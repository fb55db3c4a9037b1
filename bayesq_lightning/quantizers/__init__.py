"""Scalar quantizers: the codec (codes <-> weights, storage cost), uniform grids, codebooks.

``codec`` decodes and counts storage; ``uniform`` designs scale/zero grids; ``nonuniform``
designs fp16 codebooks with ``lloyd`` (Lloyd-Max, weighted k-means) over ``mixture`` (partial
sums of the posterior mixture); ``normal`` holds the standard-normal pieces both closed forms use.
"""

from ..choices import QUANTIZERS, SUPPORTED_BITS, check_bits
from .codec import (
    META_BITS,
    block_storage_bits,
    dequantize,
    expand_groups,
    round_levels,
    round_uniform,
    storage_bits,
)
from .lloyd import lloyd_max
from .nonuniform import NonuniformGrid, design_nonuniform, expected_sq_error_levels
from .uniform import UniformGrid, design_uniform, expected_sq_error_uniform

__all__ = [
    "META_BITS",
    "QUANTIZERS",
    "SUPPORTED_BITS",
    "NonuniformGrid",
    "UniformGrid",
    "block_storage_bits",
    "check_bits",
    "dequantize",
    "design_nonuniform",
    "design_uniform",
    "expand_groups",
    "expected_sq_error_levels",
    "expected_sq_error_uniform",
    "lloyd_max",
    "round_levels",
    "round_uniform",
    "storage_bits",
]
