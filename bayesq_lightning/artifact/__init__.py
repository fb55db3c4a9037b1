"""The packed model and its files.

* :mod:`.manifest` -- the manifest schema: records of packed layers, blocks and the artifact;
* :mod:`.packing` -- bit packing of integer codes;
* :mod:`.storage` -- storage and decoding of a packed weight (the base of the packed layers);
* :mod:`.modules` -- :class:`QuantizedLinear`, :class:`QuantizedConv2d`, :class:`QuantizedEmbedding`;
* :mod:`.kernels`, :mod:`.dispatch` -- stock integer kernels and :func:`set_kernel`;
* :mod:`.tuning` -- quantizer parameters trained with the codes frozen (distillation);
* :mod:`.replace` -- putting packed layers into a model (:func:`replace_quantized_layers`);
* :mod:`.export` -- the safetensors artifact (:func:`save_quantized`, :func:`load_quantized`).

Depends only on the codec (:mod:`bayesq_lightning.quantizers.codec`) and the result records.
"""

from .dispatch import set_kernel
from .export import load_quantized, save_quantized
from .manifest import ArtifactError
from .modules import QuantizedConv2d, QuantizedEmbedding, QuantizedLinear
from .packing import pack_codes, packed_nbytes, unpack_codes
from .replace import replace_quantized_layers

__all__ = [
    "ArtifactError",
    "QuantizedConv2d",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "load_quantized",
    "pack_codes",
    "packed_nbytes",
    "replace_quantized_layers",
    "save_quantized",
    "set_kernel",
    "unpack_codes",
]
