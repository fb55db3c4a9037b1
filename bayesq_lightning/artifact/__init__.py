"""The packed model and its files: bit packing, packed layers, the safetensors artifact.

Depends only on the codec (:mod:`bayesq_lightning.quantizers.codec`) and the result records.
"""

from .export import ArtifactError, load_quantized, save_quantized
from .modules import QuantizedConv2d, QuantizedLinear, replace_quantized_layers, set_kernel
from .packing import pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "ArtifactError",
    "QuantizedConv2d",
    "QuantizedLinear",
    "load_quantized",
    "pack_codes",
    "packed_nbytes",
    "replace_quantized_layers",
    "save_quantized",
    "set_kernel",
    "unpack_codes",
]
